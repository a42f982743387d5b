"""state_norm: dim standardises the frozen states per row and dimension over the real items."""
import torch

from recbole_iisan.model.states import standardize_states


def test_standardize_states_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    states = torch.randn(9, 3, 5, generator=g) * torch.tensor([1.0, 300.0, 5e3]).view(1, 3, 1)
    states[0] = 0
    states[1:, 0, 2] = 7.0  # a constant dimension (e.g. the embedding-layer CLS row) -> zeros, no NaN
    out = standardize_states(states.half())
    real = states[1:]
    expected = (real - real.mean(0)) / real.std(0).clamp_min(1e-6)
    expected[:, 0, 2] = 0
    assert out.dtype == torch.float16 and torch.count_nonzero(out[0]) == 0
    torch.testing.assert_close(out[1:].float(), expected, atol=2e-2, rtol=1e-2)
    assert torch.isfinite(out).all()
