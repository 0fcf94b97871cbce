"""Sample budgets: a large model's stages take the samples their compute and memory allow."""

import torch

from compressor.runtime import costs as budgets
from compressor.runtime.costs import SampleCosts
from compressor.runtime.graph import live_bytes
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2

GIB = 1 << 30


def test_a_small_model_uses_every_sample():
    small = SampleCosts(flops_per_sample=10**6, activation_bytes_per_sample=10**4, model_bytes=10**7)
    assert small.calibration_samples(512) == 512
    assert small.calibration_batch(512) == 512  # all at once: decomposed as reached
    assert small.sequential_samples(128) == 128
    assert small.latency_batches((1, 32)) == ([1, 32], [])
    assert small.evaluation_batch(64) == 64


def test_a_billion_parameter_decoder_is_capped_by_compute_and_memory():
    # TinyLlama's shape at 256 tokens: 563 GFLOP and about 27 MiB of activations per sample.
    large = SampleCosts(flops_per_sample=563 * 10**9, activation_bytes_per_sample=27 << 20,
                   model_bytes=4.4 * GIB)
    assert large.calibration_samples(64) == budgets.CALIBRATION_FLOPS // (563 * 10**9)
    assert large.sequential_samples(64) == budgets.SEQUENTIAL_FLOPS // (563 * 10**9)
    assert large.latency_batches((1, 32)) == ([1], [32])
    # Its logits: 256 positions × 32000 classes in float32 per sample, 8 copies to score them.
    logits = SampleCosts(10**9, 27 << 20, int(4.4 * GIB), output_bytes_per_sample=256 * 32000 * 4)
    assert logits.evaluation_batch(64) == int(2.2 * GIB // ((27 << 20) + 8 * 256 * 32000 * 4))
    # Memory wins over the compute floor: activations too large for even MIN_SAMPLES.
    heavy = SampleCosts(flops_per_sample=10**6, activation_bytes_per_sample=GIB, model_bytes=4 * GIB)
    assert heavy.sequential_samples(128) == 1 and heavy.calibration_batch(64) == 2


def test_measuring_counts_the_flops_and_the_live_activations_of_one_sample(tmp_path):
    module = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    one = example_inputs(MODEL_CLASSES["text"](), batch=1, seed=0)
    four = example_inputs(MODEL_CLASSES["text"](), batch=4, seed=0)
    measured = SampleCosts.measure(module, one)
    assert measured.flops_per_sample > 0 and measured.model_bytes == sum(
        t.numel() * t.element_size() for t in module.state_dict().values())
    live, outputs = live_bytes(module, one)
    assert (measured.activation_bytes_per_sample, measured.output_bytes_per_sample) == (live, outputs)
    assert live > outputs > 0
    assert live_bytes(module, four)[0] > 3 * live and live_bytes(module, four)[1] == 4 * outputs
