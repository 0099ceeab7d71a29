"""engine/graphs.py on the CPU, where a capture is simulated as a GPU does it: capturing only records a
micro-batch's work, which runs when the graph is replayed. Every micro-batch must count once in the gradient
whether it ran eagerly, was captured or was replayed; a capture must come straight after an eager run of the
same micro-batch (its last warm-up, so that compilation and autotuning never happen inside a capture: the
Llama-2-7B recipe's capture failed when a recompiled block benchmarked a kernel there); and a failed capture
leaves the run eager and correct."""

import torch

from conftest import CPU, FP32, tiny_model, trainable_grads
from snugtune.data.batches import collate
from snugtune.engine.graphs import StepGraphs
from snugtune.engine.step import forward_backward


class RecordedWork:
    """Stands for a captured torch.cuda.CUDAGraph: replay() runs the recorded work on the static inputs."""

    def __init__(self, work):
        self.replay = work


def shape_key(inputs: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in inputs.items())


def recording_graphs(model, events: list, fail: bool = False) -> StepGraphs:
    """StepGraphs on the CPU with captures on: each capture (or, with fail, an error) and each eager run logged."""
    graphs = StepGraphs(model, CPU, FP32, FP32.grad_scaler())
    graphs.captures = True
    eager = graphs._eager

    def logged_eager(on_device, key):
        events.append(("eager", key))
        return eager(on_device, key)

    def capture(static):
        events.append(("capture", shape_key(static)))
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        loss = torch.zeros(())
        return RecordedWork(lambda: loss.copy_(graphs._forward_backward(static))), static, loss

    graphs._eager, graphs._capture = logged_eager, capture
    return graphs


def micro_batches(tokenizer, data) -> list:
    """Two shapes, A and B, in the order A A A B A B B A B: each is captured at its third run; then A is
    replayed twice and B once."""
    a, b = collate(data.train[:2], tokenizer.pad_token_id), collate(data.train[2:5], tokenizer.pad_token_id)
    assert a["input_ids"].shape != b["input_ids"].shape
    return [a, a, a, b, a, b, b, a, b]


def through_graphs(tmp_path, alpaca_file, fail: bool = False):
    """Run the micro-batches once eagerly (the reference), then through recording StepGraphs. Returns
    (events, graphs, losses, gradients, the reference's losses and gradients)."""
    _, model, tokenizer, data = tiny_model(tmp_path, alpaca_file, lora={"dropout": 0.0})
    batches = micro_batches(tokenizer, data)
    weight = 1.0 / len(batches)
    model.zero_grad(set_to_none=True)
    expected_losses = [float(forward_backward(model, dict(b), weight, FP32, FP32.grad_scaler(), fixed_shape=True))
                       for b in batches]
    expected = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    events = []
    graphs = recording_graphs(model, events, fail)
    losses = [float(graphs.forward_backward(b, weight)) for b in batches]
    return events, graphs, losses, trainable_grads(model), expected_losses, expected


def test_every_micro_batch_counts_once_and_each_capture_follows_an_eager_run_of_it(tmp_path, alpaca_file):
    events, graphs, losses, grads, expected_losses, expected = through_graphs(tmp_path, alpaca_file)

    captures = [i for i, (kind, _) in enumerate(events) if kind == "capture"]
    assert len(captures) == 2 and graphs.failure is None
    for i in captures:
        assert events[i - 1] == ("eager", events[i][1])  # the shape's last warm-up ran right before
    assert len([e for e in events if e[0] == "eager"]) == len(losses) - 3  # three replays
    assert max(abs(x - y) for x, y in zip(losses, expected_losses)) < 1e-4
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name


def test_a_failed_capture_leaves_the_run_eager_with_the_same_gradients(tmp_path, alpaca_file):
    events, graphs, _, grads, _, expected = through_graphs(tmp_path, alpaca_file, fail=True)

    assert graphs.failure == "RuntimeError: operation not permitted when stream is capturing"
    assert [kind for kind, _ in events].count("capture") == 1  # no capture is tried after a failure
    assert len([e for e in events if e[0] == "eager"]) == 9 and not graphs.graphs
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name
