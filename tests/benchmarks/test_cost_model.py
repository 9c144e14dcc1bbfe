"""benchmarks/cost_model.py: every term against a hand-computed case, the closed-form decode sum against a loop over
steps, and the layout search against brute force."""

import math

import pytest

from benchmarks import cost_model as cm

# Round numbers so every expectation below can be checked by hand.
GPU = cm.Gpu(name="test", peak_flops=1e15, hbm_bytes_per_s=1e12, nvlink_bytes_per_s=100e9, network_bytes_per_s=25e9,
             pcie_bytes_per_s=10e9, memory_bytes=80e9, gpus_per_node=8)
EFF = cm.Efficiency(learner_mfu=0.5, prefill_mfu=0.5, decode_hbm_efficiency=0.5, collective_efficiency=0.5,
                    zero_overlap=0.0, sync_overhead=2.0, sync_latency_s=0.01, memory_headroom=1.0,
                    host_adam_params_per_s=1e9)
MODEL = cm.ModelShape("1B", params=1e9, layers=10, kv_heads=2, head_dim=64)  # 2e9 weight bytes


def test_model_bytes():
    assert MODEL.weight_bytes == 2e9
    assert MODEL.kv_bytes_per_token == 2 * 10 * 2 * 64 * 2 == 5120


def test_ring_collective_moves_all_but_ones_own_share():
    assert cm.ring_seconds(8e9, 4, 1e9) == pytest.approx(6.0)  # 8e9 * 3/4 / 1e9
    assert cm.ring_seconds(8e9, 1, 1e9) == 0.0


def test_links_inside_and_across_nodes():
    assert cm.link_bytes_per_s(GPU, EFF, 8) == pytest.approx(50e9)  # NVLink 100e9 * 0.5
    assert cm.link_bytes_per_s(GPU, EFF, 9) == pytest.approx(12.5e9)  # network 25e9 * 0.5


def test_engine_tp_is_the_smallest_power_of_two_with_a_half_gpu_shard():
    h100 = cm.Gpu()
    assert cm.engine_tp(cm.MODEL_7B, h100) == 1  # 14 GB <= 40 GB
    assert cm.engine_tp(cm.MODEL_70B, h100) == 4  # 140 / 2 = 70 GB > 40; 140 / 4 = 35 GB <= 40


def test_learner_memory_rule():
    assert cm.learner_bytes_per_gpu(MODEL, 4, 2, False, True) == pytest.approx(2e9 + 14e9 / 4 + 2e9)  # 7.5e9
    assert cm.learner_bytes_per_gpu(MODEL, 4, 3, False, True) == pytest.approx(18e9 / 4)
    assert cm.learner_bytes_per_gpu(MODEL, 4, 3, True, True) == pytest.approx(6e9 / 4)
    assert cm.learner_bytes_per_gpu(MODEL, 4, 3, False, False) == pytest.approx(16e9 / 4)
    small = cm.Gpu(memory_bytes=5e9)
    assert cm.choose_zero(MODEL, small, EFF, 4, True) == (3, False)  # ZeRO-2 needs 7.5e9, ZeRO-3 4.5e9
    assert cm.choose_zero(MODEL, cm.Gpu(memory_bytes=2e9), EFF, 4, True) == (3, True)  # only offload (1.5e9) fits
    assert cm.choose_zero(MODEL, cm.Gpu(memory_bytes=1e9), EFF, 4, True) is None


def test_kv_capacity():
    # (80e9 * 1.0 * tp 1 - 2e9) / (5120 * 1000) = 15234.375 -> 15234 sequences of 1000 tokens
    assert cm.kv_capacity_seqs(MODEL, GPU, EFF, 1, 1000) == 15234


def test_decode_step_is_the_slower_of_memory_and_compute():
    # memory: (2e9 + 10 * 100 * 5120) / (1e12 * 0.5) = 4.01024e-3 s; compute: 2e9 * 10 / (1e15 * 0.5) = 4e-5 s
    assert cm.decode_step_seconds(MODEL, GPU, EFF, 1, 10, 100) == pytest.approx(4.01024e-3)
    # a batch of 100,000: compute 2e9 * 1e5 / 5e14 = 0.4 s beats memory (2e9 + 1e5 * 100 * 5120) / 5e11 = 0.1064 s
    assert cm.decode_step_seconds(MODEL, GPU, EFF, 1, 100_000, 100) == pytest.approx(0.4)
    # tensor parallelism splits both
    assert cm.decode_step_seconds(MODEL, GPU, EFF, 2, 10, 100) == pytest.approx(4.01024e-3 / 2)


def test_generate_by_hand_and_against_a_loop_over_steps():
    w = cm.Workload(samples=8, prompt_tokens=10, response_tokens=3, max_num_seqs=2)
    layout = cm.Layout(gpus=3, learner_gpus=1, tp=1, zero_stage=2)  # 2 engines, 4 sequences each: 2 waves of 2
    # per wave: prefill 2e9 * 10 * 2 / 5e14 = 8e-5 s; 3 decode steps at the mean context 10 + 4/2 = 12:
    # (2e9 + 2 * 12 * 5120) / 5e11 = 4.00024576e-3 s each
    by_hand = 2 * (8e-5 + 3 * 4.00024576e-3)
    assert cm.generate_seconds(MODEL, GPU, EFF, w, layout) == pytest.approx(by_hand)
    loop = 2 * (8e-5 + sum(cm.decode_step_seconds(MODEL, GPU, EFF, 1, 2, 10 + s) for s in range(1, 4)))
    assert cm.generate_seconds(MODEL, GPU, EFF, w, layout) == pytest.approx(loop)


def test_learner_flops_and_seconds():
    w = cm.Workload(samples=2, prompt_tokens=3, response_tokens=5, epochs=1, num_minibatches=4)
    assert cm.learner_flops(MODEL, w) == pytest.approx((2 * 2 + 6) * 1e9 * 16)  # 16 tokens, 2 forwards + 1 epoch
    no_fwd = cm.Workload(samples=2, prompt_tokens=3, response_tokens=5, epochs=2, policy_forward=False,
                         reference=False)
    assert cm.learner_flops(MODEL, no_fwd) == pytest.approx(12 * 1e9 * 16)
    # ZeRO on 4 GPUs in one node: one all-gather = 2e9 * 3/4 / 50e9 = 0.03 s
    assert cm.zero_comm_seconds(MODEL, GPU, EFF, w, 4, 2) == pytest.approx(4 * 2 * 0.03)  # 4 steps x (RS + AG)
    assert cm.zero_comm_seconds(MODEL, GPU, EFF, w, 4, 3) == pytest.approx(4 * 3 * 0.03 + 2 * 4 * 0.03)
    # offload: per step 2.5e8 params / 1e9 + 2 * 2.5e8 * 2 bytes / 10e9 = 0.25 + 0.1 s; 4 steps
    assert cm.offload_seconds(MODEL, GPU, EFF, w, 4) == pytest.approx(4 * 0.35)
    parts = cm.learner_seconds(MODEL, GPU, EFF, w, cm.Layout(8, 4, 1, 3, offload=True))
    compute = 1.6e11 / (4 * 1e15 * 0.5)
    assert parts["compute"] == pytest.approx(compute)
    assert parts["total"] == pytest.approx(compute + 0.6 + 1.4)
    half = cm.learner_seconds(MODEL, GPU, cm.Efficiency(**{**EFF.__dict__, "zero_overlap": 0.5}), w,
                              cm.Layout(8, 4, 1, 3, offload=True))
    assert half["total"] == pytest.approx(compute + 0.3 + 1.4)


def test_sync_gathers_then_broadcasts_over_the_slowest_link():
    inside = cm.sync_seconds(2e9, GPU, EFF, 4, 8, gather=True)
    assert inside["gather"] == pytest.approx(0.03) and inside["broadcast"] == pytest.approx(0.04)  # 2e9 / 50e9
    assert inside["seconds"] == pytest.approx(0.07 * 2.0 + 0.01)
    across = cm.sync_seconds(2e9, GPU, EFF, 4, 16, gather=False)
    assert across["gather"] == 0.0 and across["broadcast"] == pytest.approx(0.16)  # 2e9 / 12.5e9
    assert across["raw"] == pytest.approx(0.16)


def test_best_layout_is_the_fastest_fitting_split_and_says_why_when_none_fits():
    h100, w = cm.Gpu(), cm.Workload()
    best = cm.best_layout(cm.MODEL_7B, h100, EFF, w, 16)
    candidates = []
    for g in cm.learner_sizes(16, h100):
        zero = cm.choose_zero(cm.MODEL_7B, h100, EFF, g, True)
        if zero is not None and 16 - g >= 1:
            candidates.append(cm.iteration(cm.MODEL_7B, h100, EFF, w, cm.Layout(16, g, 1, *zero)))
    assert best["fits"] and best["iteration_seconds"] == pytest.approx(min(c["iteration_seconds"]
                                                                           for c in candidates))
    assert best["iteration_seconds"] == pytest.approx(best["generate_seconds"] + best["learner_seconds"]
                                                      + best["sync_seconds"])
    none = cm.best_layout(cm.MODEL_70B, h100, EFF, w, 8)
    assert not none["fits"] and none["iteration_seconds"] is None and "tp=4" in none["why"]
    assert not math.isnan(cm.best_layout(cm.MODEL_70B, h100, EFF, w, 64)["iteration_seconds"])
