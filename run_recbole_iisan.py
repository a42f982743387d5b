"""Train and evaluate IISAN / IISAN-Versa (or any RecBole model) on a dataset, RecBole style.

    python run_recbole_iisan.py --model=IISANVA --dataset=ml-100k
    python run_recbole_iisan.py --dataset=ml-100k --compare=SASRec,GRU4Rec,IISANVS,IISANVA

See ``python run_recbole_iisan.py --help`` and README.md.
"""
import sys

from recbole_iisan.quick_start.cli import main

if __name__ == "__main__":
    sys.exit(main())
