"""--device / --dtype: resolution, clear errors, bf16 against float32, and the gpu-marked checks."""

import json

import pytest
import torch

import featcircuits as fc
from featcircuits import lrp
from featcircuits.cli import main
from featcircuits.devices import resolve_device, resolve_dtype
from featcircuits.errors import UserError
from featcircuits.testing import random_saelens_set, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# bf16 keeps 8 mantissa bits (relative rounding 2^-8 = 0.4 %) in every activation of every
# layer. Measured on tiny gemma3 / llama / gpt2 with random sae-lens dictionaries (16 pairs,
# relp and atp): max |effect_bf16 - effect_fp32| was 1.2-5.0 % of max |effect_fp32| and the
# correlation 0.9994-0.99996. The tolerance is twice the worst deviation measured: 10 % of the
# largest effect, and correlation at least 0.995.
BF16_MAX_REL = 0.10
BF16_MIN_CORR = 0.995


def _flat(effects: dict) -> torch.Tensor:
    return torch.cat([torch.cat([v.f.flatten(), v.err.flatten()]) for v in effects.values()]).float()


def _spliced(family: str, dtype: torch.dtype, folder, device: str = "cpu") -> fc.SplicedModel:
    model = tiny_model(family)
    model.hf.to(device=device, dtype=dtype)
    return fc.SplicedModel(model, fc.load_dictionary_set(str(folder), model.adapter))


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("float8")
    with pytest.raises(UserError, match="unknown device|unsupported device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_unavailable_cuda_is_one_clear_line(tiny_model_dir, capsys):
    with pytest.raises(UserError, match="--device cuda:1 but torch sees no CUDA device"):
        resolve_device("cuda:1")
    assert main(["info", "--model", str(tiny_model_dir), "--saes", "identity", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "torch sees no CUDA device" in err[0]


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_rules_leave_the_bf16_forward_unchanged(family, tmp_path):
    random_saelens_set(tiny_model(family), tmp_path)
    sm = _spliced(family, torch.bfloat16, tmp_path)
    assert sm.dictionary("resid_0").sae.W_enc.dtype == torch.bfloat16  # dictionaries followed the model
    batch, _ = fc.tokenize_pairs(fc.make_pairs("sva-nounpp", 4), sm.model.tokenizer)
    plain, _ = sm.cache(batch.inputs())
    tape = lrp.ReferenceTape()
    with torch.no_grad(), lrp.recording(tape):
        sm.cache(batch.inputs("patch"))
    for rules, ref in ((lrp.RULES, None), ("two-point", tape)):
        with lrp.lrp_rules(rules), lrp.replaying(ref):
            ruled, leaves = sm.run_with_leaves(batch.inputs())
            (g,) = torch.autograd.grad(ruled.float().sum(), [leaves["embed"].f])
        assert ruled.dtype == torch.bfloat16 and torch.equal(plain, ruled.detach())
        assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saes")
    random_saelens_set(tiny_model("gemma3"), folder)
    return folder


def test_bf16_discover_matches_float32(sae_folder):
    circuits = {}
    for dtype in (torch.float32, torch.bfloat16):
        sm = _spliced("gemma3", dtype, sae_folder)
        batch, _ = fc.tokenize_pairs(fc.make_pairs("sva-nounpp", 16), sm.model.tokenizer)
        circuits[dtype] = fc.discover_circuit(sm, batch, "relp", thresholds=fc.Thresholds(top_k=20), progress=False)
    a, b = _flat(circuits[torch.float32].effects), _flat(circuits[torch.bfloat16].effects)
    assert b.dtype == torch.float32  # accumulated in float32 whatever the model dtype
    assert (a - b).abs().max() <= BF16_MAX_REL * a.abs().max()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] >= BF16_MIN_CORR
    assert circuits[torch.bfloat16].provenance["dtype"] == "bfloat16"
    assert circuits[torch.float32].provenance["device"] == "cpu"


def test_cli_records_device_and_dtype(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--n", "4", "--top-k", "5",
                 "--no-edges", "--device", "cpu", "--dtype", "bfloat16", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["dtype"] == "bfloat16"


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_discover_equals_cpu(sae_folder, dtype):
    circuits = {}
    for device in ("cpu", "cuda"):
        sm = _spliced("gemma3", dtype, sae_folder, device)
        batch, _ = fc.tokenize_pairs(fc.make_pairs("sva-nounpp", 16), sm.model.tokenizer)
        circuits[device] = fc.discover_circuit(sm, batch, "relp", thresholds=fc.Thresholds(top_k=20), progress=False)
    a, b = _flat(circuits["cpu"].effects), _flat(circuits["cuda"].effects)
    # float32: kernels differ only in summation order; bf16: the stated bf16 tolerance
    tol = 1e-4 if dtype == torch.float32 else BF16_MAX_REL
    assert (a - b).abs().max() <= tol * a.abs().max()
    assert circuits["cuda"].provenance["device"].startswith("cuda")
    if dtype == torch.float32:
        assert set(circuits["cpu"].graph.nodes) == set(circuits["cuda"].graph.nodes)


@pytest.mark.gpu
@needs_cuda
def test_cuda_cli_bf16(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--n", "8", "--top-k", "10",
                 "--device", "cuda", "--dtype", "bfloat16", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["dtype"] == "bfloat16" and summary["n_nodes"] > 0


# ---------------------------------------------------------------- --batch-size auto


def test_auto_batch_size_on_cpu_is_positive_and_respects_the_cap(sae_folder, monkeypatch):
    from featcircuits import batching

    sm = _spliced("gemma3", torch.float32, sae_folder)
    batch, _ = fc.tokenize_pairs(fc.make_pairs("sva-nounpp", 32), sm.model.tokenizer)
    size, why = batching.resolve_batch_size(sm, batch, "auto", "relp")
    assert why["rule"] == "auto" and why["bytes_per_example"] > 0 and 1 <= size <= len(batch)
    assert batching.resolve_batch_size(sm, batch, "auto:3", "relp")[0] == 3  # plenty free: the cap decides
    # IG stacks steps rows per example: it costs more per example than RelP
    assert batching.example_cost(sm, batch, "ig", steps=8) > batching.example_cost(sm, batch, "relp")
    # the rule itself: fraction * free // per_example, at least 1
    monkeypatch.setattr(batching, "example_cost", lambda *a, **k: 1000)
    monkeypatch.setattr(batching, "free_memory", lambda device: 10_000)
    assert batching.resolve_batch_size(sm, batch, "auto", "relp")[0] == 5
    monkeypatch.setattr(batching, "free_memory", lambda device: 1)
    assert batching.resolve_batch_size(sm, batch, "auto", "relp")[0] == 1
    with pytest.raises(UserError, match="positive integer, 'auto'"):
        batching.parse_batch_size("auto:0")


def test_cli_batch_size_auto(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--n", "6", "--top-k", "5",
                 "--no-edges", "--batch-size", "auto:4", "--out", str(out)]) == 0
    batching = json.loads((out / "summary.json").read_text())["batching"]
    assert batching["rule"] == "auto" and batching["batch_size"] == 4
    with pytest.raises(SystemExit) as exc:
        main(["discover", "--batch-size", "lots", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2


def test_forward_cost_counts_stacked_rows_and_drives_auto(sae_folder, monkeypatch):
    """Stages without a backward (evaluation, exact patching) are sized by ``forward_cost``:
    more stacked rows cost more; the costliest stage of a run decides."""
    from featcircuits import batching

    sm = _spliced("gemma3", torch.float32, sae_folder)
    batch, _ = fc.tokenize_pairs(fc.make_pairs("sva-nounpp", 8), sm.model.tokenizer)
    one, four = batching.forward_cost(sm, batch, 1), batching.forward_cost(sm, batch, 4)
    assert 0 < one < four
    _, why = batching.resolve_batch_size(sm, batch, "auto", (), forward_rows=4)
    assert list(why["bytes_per_example_by_stage"]) == ["forward x4"]
    _, why = batching.resolve_batch_size(sm, batch, "auto", ["relp", "random"], edges=False, forward_rows=4)
    assert set(why["bytes_per_example_by_stage"]) == {"relp", "forward x4"}
    assert why["bytes_per_example"] == max(why["bytes_per_example_by_stage"].values())
    # the rule on the costliest stage (measurements fixed here: storages freed and reused can
    # shift a measurement by a few tensors between calls)
    monkeypatch.setattr(batching, "forward_cost", lambda sm, batch, rows=1, probe=2: 1000 * rows)
    monkeypatch.setattr(batching, "example_cost", lambda *a, **k: 3000)
    monkeypatch.setattr(batching, "free_memory", lambda device: 40_000)
    assert batching.resolve_batch_size(sm, batch, "auto", (), forward_rows=4)[0] == 5
    assert batching.resolve_batch_size(sm, batch, "auto", ["relp"], forward_rows=1)[0] == 6


def test_batch_size_auto_on_curves_agreement_and_evaluate(tiny_model_dir, tmp_path):
    """``--batch-size auto:CAP`` reaches curves, agreement and evaluate through the one resolver."""
    common = ["--model", str(tiny_model_dir), "--task", "sva-nounpp", "--n", "6", "--batch-size", "auto:3"]
    assert main(["curves", *common, "--saes", "identity", "--methods", "atp,random", "--thresholds", "2",
                 "--no-progress", "--out", str(tmp_path / "curves")]) == 0
    got = json.loads((tmp_path / "curves" / "curves.json").read_text())["settings"]
    assert got["batching"]["rule"] == "auto" and got["batch_size"] == 3
    assert main(["agreement", *common, "--methods", "atp", "--no-variant", "--repeats", "1", "--quiet",
                 "--out", str(tmp_path / "agreement")]) == 0
    got = json.loads((tmp_path / "agreement" / "agreement.json").read_text())
    assert got["batching"]["rule"] == "auto" and got["batch_size"] == 3
    assert "forward x" + str(got["seq_len"]) in got["batching"]["bytes_per_example_by_stage"]
    assert main(["discover", *common[:-2], "--saes", "identity", "--top-k", "5", "--no-edges", "--no-eval",
                 "--no-cards", "--out", str(tmp_path / "circuit")]) == 0
    assert main(["evaluate", "--circuit", str(tmp_path / "circuit"), "--batch-size", "auto:3"]) == 0
    got = json.loads((tmp_path / "circuit" / "evaluation.json").read_text())["settings"]
    assert got["batching"]["rule"] == "auto" and got["batch_size"] == 3


# ---------------------------------------------------------------- --device-map


def test_device_map_auto_gives_the_same_circuit(tiny_model_dir, tmp_path):
    """``--device-map auto`` (accelerate places the layers; on this CPU machine all on the cpu)
    gives the discover result of a plain load, and records the placement."""
    common = ["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--n", "6", "--top-k", "8",
              "--batch-size", "3", "--no-eval", "--no-cards"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--device-map", "auto", "--out", str(tmp_path / "mapped")]) == 0
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("plain", "mapped"))
    assert a.get("device_map") is None
    assert b["device_map"]["requested"] == "auto" and set(b["device_map"]["placed"].values()) == {"cpu"}
    ga, gb = (json.loads((tmp_path / d / "graph.json").read_text()) for d in ("plain", "mapped"))
    assert ga["nodes"] == gb["nodes"] and ga[_links(ga)] == gb[_links(gb)] and ga["nodes"]
    assert a["model_sha256"] == b["model_sha256"]


def _links(graph: dict) -> str:
    return "edges" if "edges" in graph else "links"


def test_device_map_refusals(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An explicit --device beside --device-map, an offloading map, torchrun and a missing
    accelerate: one line each, exit code 2 / UserError, before or instead of a wrong result."""
    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu", "--device-map", "auto"]) == 2
    assert "drop --device cpu" in capsys.readouterr().err
    offload = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
               "lm_head": "cpu", "model.rotary_emb": "cpu"}
    with pytest.raises(UserError, match="offloading is not supported"):
        fc.load_model(str(tiny_model_dir), device_map=offload, offload_folder=tmp_path / "offload")
    with pytest.raises(UserError, match="unknown --device-map"):
        fc.load_model(str(tiny_model_dir), device_map="balanced")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun"):
        fc.load_model(str(tiny_model_dir), device_map="auto")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setitem(__import__("sys").modules, "accelerate", None)  # as if not installed
    with pytest.raises(UserError, match="needs accelerate"):
        fc.load_model(str(tiny_model_dir), device_map="auto")
