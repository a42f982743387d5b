"""LayerDrop: the blocks each scheme keeps, against the authors' scripts and the paper's Eq. 5."""
import pytest

from recbole_iisan.towers.spec import resolve_towers
from recbole_iisan.towers.layer_select import (
    group_stride,
    hidden_state_indices,
    select_blocks,
    tower_layers,
    tower_layers_from_config,
)


@pytest.mark.parametrize("n, script, eq5", [
    (24, [3, 7, 11, 15, 19, 23], [3, 7, 11, 15, 19, 23]),      # BERT-large: the "6(even_all)" default
    (32, [1, 7, 13, 19, 25, 31], [1, 7, 13, 19, 25, 31]),      # Llama-7/8B, Mistral
    (28, [2, 7, 12, 17, 22, 27], [2, 7, 12, 17, 22, 27]),      # Gemma-7b
    (80, [4, 19, 34, 49, 64, 79], [9, 23, 37, 51, 65, 79]),    # Llama-70B: scripts stride 15, Eq. 5 stride 14
])
def test_group_layerdrop_matches_the_authors_table(n, script, eq5) -> None:
    assert select_blocks(n, "even_all", k=6) == script
    assert select_blocks(n, "even_all", k=6, stride_rule="eq5", n_other=12) == eq5
    assert group_stride(n, 6, "eq5", 12) == eq5[1] - eq5[0]


def test_schemes_for_a_12_layer_encoder() -> None:
    assert select_blocks(12, "even") == [1, 3, 5, 7, 9, 11]
    assert select_blocks(12, "all") == list(range(12))
    assert select_blocks(12, "top", k=6) == [6, 7, 8, 9, 10, 11]
    assert select_blocks(12, "down", k=6) == [0, 1, 2, 3, 4, 5]
    assert select_blocks(24, "even_top") == [13, 15, 17, 19, 21, 23]  # Table VIII's "even_top12"
    assert select_blocks(12, [3, 1]) == [1, 3]
    with pytest.raises(ValueError, match="block indices must be in 0..11"):
        select_blocks(12, [12])
    with pytest.raises(ValueError, match="layer_scheme"):
        select_blocks(12, "odd")


def test_vs_and_va_rows_include_the_embedding_state() -> None:
    vs = tower_layers({"text": 12, "image": 12})
    assert vs == {"text": [0, 2, 4, 6, 8, 10, 12], "image": [0, 2, 4, 6, 8, 10, 12]}  # 7 SANBs each
    va = tower_layers({"text": 24, "image": 12})
    assert va["text"] == [0, 4, 8, 12, 16, 20, 24] and len(va["image"]) == 7
    assert tower_layers({"text": 12, "image": 12}, include_embedding_state=False)["text"] == [2, 4, 6, 8, 10, 12]
    assert tower_layers({"text": 24, "image": 12}, layerdrop=False)["text"] == list(range(25))
    assert hidden_state_indices([1, 3]) == [0, 2, 4]


def test_from_config_frozen_backbone_and_overrides() -> None:
    assert tower_layers_from_config({"frozen_backbone": True}, {"text": 24, "image": 12}) == {"text": [24], "image": [12]}
    cfg = {"image_layers": [0, 1], "layer_scheme": "even"}
    assert tower_layers_from_config(cfg, {"text": 12, "image": 12})["image"] == [0, 1, 2]


def test_image_dir_turns_the_second_text_tower_into_the_image_tower() -> None:
    cfg = {"towers": ["text", "text2"], "image_dir": "/posters"}
    assert resolve_towers(cfg) == ["text", "image"] and cfg["towers"] == ["text", "image"]
    assert resolve_towers({"towers": ["text", "text2"], "image_dir": None}) == ["text", "text2"]
