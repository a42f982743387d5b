"""Efficiency benchmark of IISAN (cached) vs the end-to-end baselines; see recbole_iisan/efficiency.py.

    python benchmarks/efficiency.py --batch_sizes 1,2,4 --steps 3          # CPU, MiniLM + dinov2-small
    python benchmarks/efficiency.py --device cuda --batch_sizes 1,2,4,8,16,32 \
        --text_encoder bert-base-uncased --image_encoder google/vit-base-patch16-224   # the paper's setting
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole_iisan.efficiency import main  # noqa: E402

if __name__ == "__main__":
    main()
