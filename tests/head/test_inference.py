import torch

from sdm_hf.head.inference import hr_masks, lower_bound


def test_hr_masks_reproduce_predict_at_the_heads_alpha(small_head):
    head, x, _ = small_head
    out = head.predict(x[300:])
    in_hr, in_hr_lower = hr_masks(out, head.alpha, head.q_min, head.thresholds)
    assert torch.equal(in_hr, out.in_hr) and torch.equal(in_hr_lower, out.in_hr_lower)
    assert bool(out.in_hr.any())  # the check is not vacuous on this data


def test_lower_variant_admits_a_subset_and_moves_d_down(small_head):
    head, x, _ = small_head
    out = head.predict(x[300:])
    low = lower_bound(out.logits, out.prediction, out.q, out.d, out.effective_sample_size, head.alpha)
    assert torch.equal(low.d_lower, out.d_lower) and bool((low.d_lower <= out.d).all())
    assert bool((out.d_upper >= out.d).all())
    assert not bool((out.in_hr_lower & ~out.in_hr).any())


def test_sweeping_alpha_without_a_new_search(small_head):
    head, x, _ = small_head
    out = head.predict(x[300:])
    head.recalibrate(alpha=0.8)
    again = head.predict(x[300:])
    in_hr, in_hr_lower = hr_masks(out, 0.8, head.q_min, head.thresholds)
    assert torch.equal(in_hr, again.in_hr) and torch.equal(in_hr_lower, again.in_hr_lower)
