"""BlockFFN layer, sparsity metrics, CLS objectives and the byte-level tiny LM."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekit.compress.moe.objectives import activation_locality, chunk_sparsification, routing_losses
from edgekit.errors import UserError
from edgekit.models import byte_text
from edgekit.models.blockffn import BlockFFN, DenseFFN, chunk_sparsity, record_routing, token_sparsity
from edgekit.models.tiny_lm import TinyLM, tiny_lm_micro


def _random_block(activation="silu", bias=True, E=6, B=5, d=12, seed=0) -> BlockFFN:
    torch.manual_seed(seed)
    m = BlockFFN(d, E, B, activation, bias=bias)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        m.router_norm.weight.uniform_(0.5, 1.5)
    return m.double()


def _loop_reference(m: BlockFFN, x: torch.Tensor) -> torch.Tensor:
    """The spec's formula, one token and one expert at a time."""
    act = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}[m.activation]
    flat = x.reshape(-1, m.dim)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        logits = m.router.weight @ flat[t] + m.router.bias
        s = torch.relu(logits)
        scores = s / torch.sqrt((s**2).mean() + m.eps) * m.router_norm.weight
        y = m.out_bias.clone() if m.out_bias is not None else torch.zeros(m.dim, dtype=x.dtype)
        for e in range(m.num_experts):
            if scores[e] == 0:
                continue
            h = m.up[e] @ flat[t]
            if m.up_bias is not None:
                h = h + m.up_bias[e]
            y = y + scores[e] * (m.down[e].t() @ act(h))
        out[t] = y
    return out.reshape(x.shape)


@pytest.mark.parametrize("activation,bias", [("relu", True), ("silu", True), ("gelu", False)])
def test_forward_equals_per_expert_loop(activation, bias):
    m = _random_block(activation, bias)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    with torch.no_grad():
        logits, scores = m.route(x)
        assert logits.shape == scores.shape == (2, 7, 6)
        assert 0 < (scores == 0).float().mean() < 1  # the router really is sparse here
        torch.testing.assert_close(m(x), _loop_reference(m, x), rtol=1e-10, atol=1e-10)


def test_zero_active_token_gives_out_bias():
    m = _random_block("relu")
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.bias.fill_(-1.0)  # every logit negative: no active expert
        x = torch.randn(3, 12, dtype=torch.float64)
        _, scores = m.route(x)
        assert torch.all(scores == 0) and torch.isfinite(scores).all()
        torch.testing.assert_close(m(x), m.out_bias.expand(3, -1))
        assert token_sparsity(scores) == 1.0


def test_router_scores_are_rms_normalised():
    m = _random_block("silu")
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        logits, scores = m.route(x)
        s = logits.clamp_min(0)
        expect = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + m.eps) * m.router_norm.weight
    torch.testing.assert_close(scores, expect)


def test_dense_ffn_and_bad_activation():
    ffn = DenseFFN(8, 16, "gelu")
    x = torch.randn(4, 8)
    torch.testing.assert_close(ffn(x), ffn.fc2(F.gelu(ffn.fc1(x))))
    with pytest.raises(UserError, match="activation"):
        BlockFFN(8, 2, 4, activation="tanh")


# -- metrics ---------------------------------------------------------------------------

def _scores(pattern: list[str]) -> torch.Tensor:
    """Rows of '1'/'0' per token -> (T, E) scores."""
    return torch.tensor([[float(c) for c in row] for row in pattern])


def test_token_sparsity_known_answers():
    s = _scores(["1000", "1100", "0000", "1111"])  # 7 of 16 active
    assert token_sparsity(s) == pytest.approx(9 / 16)
    mask = torch.tensor([True, True, False, True])  # drop the all-zero token
    assert token_sparsity(s, mask) == pytest.approx(5 / 12)
    assert math.isnan(token_sparsity(s, torch.zeros(4, dtype=torch.bool)))


def test_chunk_sparsity_known_answers():
    # one sequence of 10 tokens, 3 experts, chunks of 4: two chunks, tail of 2 dropped
    seq = _scores(["100", "100", "100", "110", "001", "001", "000", "001", "111", "111"])
    # chunk 0 uses experts {0, 1}: 1 inactive; chunk 1 uses {2}: 2 inactive -> 3 / 6
    assert chunk_sparsity(seq.unsqueeze(0), chunk=4) == pytest.approx(3 / 6)
    assert chunk_sparsity(seq, chunk=4) == pytest.approx(3 / 6)  # (T, E) is one sequence
    # chunks do not cross sequences: two sequences of 5 tokens -> one chunk each, tails dropped
    two = seq.reshape(2, 5, 3)
    # seq 0 chunk: tokens 0-3 -> {0,1}; seq 1 chunk: tokens 5-8 -> {0,1,2}
    assert chunk_sparsity(two, chunk=4) == pytest.approx(1 / 6)
    assert chunk_sparsity(seq, chunk=1) == pytest.approx(token_sparsity(seq[:10]))
    assert math.isnan(chunk_sparsity(seq, chunk=11))


def test_chunk_sparsity_with_mask():
    seq = _scores(["100", "111", "100", "100", "100", "010"]).unsqueeze(0)
    mask = torch.tensor([[True, False, True, True, True, True]])  # drop token 1 -> real tokens 0,2,3,4 | 5
    assert chunk_sparsity(seq, chunk=4, mask=mask) == pytest.approx(2 / 3)
    assert chunk_sparsity(seq, chunk=4) == pytest.approx(0.0)


def test_record_routing_collects_every_layer_and_restores():
    model = tiny_lm_micro(experts=4).eval()
    x = torch.randint(0, 256, (2, 9))
    with record_routing(model) as rec:
        model(x)
    assert list(rec) == ["blocks.0.ffn", "blocks.1.ffn"]
    r = rec["blocks.0.ffn"][0]
    assert r.logits.shape == r.scores.shape == (2, 9, 4) and r.scores.requires_grad
    with record_routing(model, detach=True) as rec2:
        model(x)
    assert not rec2["blocks.1.ffn"][0].scores.requires_grad
    assert all(m._records is None for m in model.modules() if isinstance(m, BlockFFN))


# -- objectives ------------------------------------------------------------------------

def test_activation_locality_values_and_gradient():
    logits = torch.tensor([[[0.02, -0.01], [0.01, 0.03], [-0.02, 0.0]]], requires_grad=True)
    alpha = 100.0
    expect = []
    for t in range(1, 3):
        for e in range(2):
            a, b = alpha * logits[0, t - 1, e].item(), alpha * logits[0, t, e].item()
            y = 1 / (1 + math.exp(-b))
            expect.append(-(y * math.log(1 / (1 + math.exp(-a))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-a)))))
    loss = activation_locality(logits, alpha)
    assert loss.item() == pytest.approx(sum(expect) / len(expect), rel=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # a masked last token leaves only the pair (0, 1)
    masked = activation_locality(logits.detach(), alpha, mask=torch.tensor([[True, True, False]]))
    assert masked.item() == pytest.approx(sum(expect[:2]) / 2, rel=1e-5)


def test_activation_locality_prefers_equal_neighbours():
    same = torch.tensor([[[1.0, -1.0]] * 4])
    flip = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]] * 2])
    assert activation_locality(same) < 1e-3 < activation_locality(flip)


def test_chunk_sparsification_values_and_gradient():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 2.0], [5.0, 5.0]]], requires_grad=True)
    p = s.detach() / (s.detach().sum(-1, keepdim=True) + 1e-5)
    # chunks of 2: tokens (0, 1) and (2, 3); token 4 is a dropped tail
    none = [(1 - p[0, 0, e]) * (1 - p[0, 1, e]) for e in range(2)] + [(1 - p[0, 2, e]) * (1 - p[0, 3, e]) for e in range(2)]
    expect = 1 - sum(float(v) for v in none) / 4
    loss = chunk_sparsification(s, chunk=2)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    assert s.grad[0, :4].abs().sum() > 0 and torch.all(s.grad[0, 4] == 0)
    # a token firing one expert per chunk scores lower than one spreading its mass
    concentrated = torch.tensor([[[1.0, 0.0]] * 4])
    spread = torch.tensor([[[1.0, 1.0]] * 4])
    assert chunk_sparsification(concentrated, 4) < chunk_sparsification(spread, 4)
    masked = chunk_sparsification(spread, 4, mask=torch.tensor([[True, False, False, False]]))
    assert masked.item() == pytest.approx(0.5, rel=1e-4)


def test_routing_losses_backpropagate_into_routers():
    model = tiny_lm_micro(experts=4)
    x = torch.randint(0, 256, (2, 16))
    with record_routing(model) as rec:
        model(x)
    al, cs = routing_losses(rec, alpha=100.0, chunk=8)
    (al + cs).backward()
    for m in model.modules():
        if isinstance(m, BlockFFN):
            assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="BlockFFN"):
        routing_losses({"x": []})


# -- the tiny LM -------------------------------------------------------------------------

def test_kv_cache_generate_equals_full_sequence_greedy():
    torch.manual_seed(0)
    model = tiny_lm_micro(experts=4).eval()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 12)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, seq)
        # the cached logits equal the full-sequence ones
        full = model(out)
        logits, past = model.step(out[:, :10])
        step, _ = model.step(out[:, 10:11], past)
        torch.testing.assert_close(torch.cat([logits, step], 1), full[:, :11], rtol=1e-5, atol=1e-5)


def test_max_seq_is_a_user_error():
    model = TinyLM(dim=16, layers=1, heads=2, ffn=32, max_seq=8).eval()
    with pytest.raises(UserError, match="at most 8"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 6)
    assert model.generate(torch.zeros(1, 4, dtype=torch.long), 5).shape == (1, 9)
    with pytest.raises(UserError, match="equal experts"):
        TinyLM(dim=16, ffn=30, experts=4)


def test_blockffn_lm_exports_to_onnx_and_matches(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = tiny_lm_micro(experts=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BlockFFN):
                m.router.weight.normal_(0, 0.3)
                m.router.bias.fill_(-0.2)  # some experts off, some tokens with none
    path = tmp_path / "lm.onnx"
    x = torch.randint(0, 256, (1, 16))
    torch.onnx.export(
        model, (x,), str(path), input_names=["input_ids"], output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}, opset_version=17, dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randint(0, 256, (2, 24))
    with record_routing(model, detach=True) as rec, torch.no_grad():
        expect = model(x2).numpy()
    assert 0 < token_sparsity(rec["blocks.0.ffn"][0].scores) < 1
    got = sess.run(None, {"input_ids": x2.numpy()})[0]
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_byte_text_windows(root):
    ids = byte_text.encode("héllo")
    assert ids.dtype == np.uint8 and len(ids) == 6 and byte_text.decode(ids) == "héllo"
    w = byte_text.windows(np.arange(10), 4)
    assert w.dtype == np.int64 and w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert byte_text.windows(np.arange(10), 4, stride=3).shape == (3, 4)
    with pytest.raises(UserError, match="fewer than one window"):
        byte_text.windows(np.arange(3), 4)
    corpus = byte_text.text_windows(root / "examples/data/python_docs_sentences.txt", 128)
    assert corpus.shape[1] == 128 and len(corpus) > 5000 and corpus.max() < 256
