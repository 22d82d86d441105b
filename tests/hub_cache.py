"""A Hugging Face cache laid out as the hub would leave it, filled with tiny stand-in weights.

``build_hub_cache(root, set_name, n_layers)`` writes, under ``root/hub``:

- the set's model repo (``models--org--name/{refs/main, blobs/, snapshots/<commit>/}``: a tiny
  config of the real ``model_type``, random weights and a word-level tokenizer), and
- every dictionary the registry's templates ask for at that model's sites, at the repo id and
  folder that sae-lens's pretrained table gives for the (release, sae_id), in that release's
  on-disk format: sae-lens folders (``cfg.json`` + ``sae_weights.safetensors``) for the Pythia
  releases, Gemma Scope's ``params.npz`` (loader ``gemma_2``), Gemma Scope 2's
  ``params.safetensors`` (loader ``gemma_3``).

An id the table lacks is not laid out (the real loader must then fail, as it would online).
Run as a script (``python tests/hub_cache.py SPEC.json``) it is the driver the tests start
with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` set: huggingface_hub reads those at import, so
they can only take effect in a fresh process, the way a user's shell sets them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# Per registered set: the model family and widths of the stand-in. Gemma Scope's loader
# (``gemma_2``) takes d_in from the repo name (2b -> 2304) and d_sae from the folder
# (width_16k -> 16384) whatever the file holds, so that stand-in must have those sizes; the
# other loaders read the sizes from the files, so those stand-ins stay tiny. Gemma Scope's
# attention SAEs read hook_z, whose width the loader also fixes (2b -> 2048): that stand-in has
# Gemma 2 2B's 8 heads of 256 (``heads``), and its attention SAEs are written at hook_z's width.
# Gemma Scope 2's attention SAEs read hook_z too; that stand-in's z (4 x 12) is wider than d_model.
STAND_INS: dict[str, dict[str, Any]] = {
    "pythia-70m-deduped": {"family": "gpt_neox", "d_model": 32, "d_sae": 64},
    "gemma-scope-2b": {"family": "gemma2", "d_model": 2304, "d_sae": 16384, "heads": (8, 256), "attn_at_z": True},
    "gemma-scope-2-270m": {"family": "gemma3", "d_model": 32, "d_sae": 64, "heads": (4, 12), "attn_at_z": True},
}


def commit_of(repo_id: str) -> str:
    """A fixed 40-hex commit per repo (the hub's snapshot folder name)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def repo_folder(hub: Path, repo_id: str) -> Path:
    return hub / ("models--" + repo_id.replace("/", "--"))


def put_file(hub: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """Store ``data`` as huggingface_hub does: a blob named by its sha256, a relative symlink
    to it from ``snapshots/<commit>/<filename>``, and ``refs/main`` naming the commit."""
    repo = repo_folder(hub, repo_id)
    commit = commit_of(repo_id)
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link


def put_folder(hub: Path, repo_id: str, folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            put_file(hub, repo_id, path.relative_to(folder).as_posix(), path.read_bytes())


def stand_in_model(set_name: str, n_layers: int, seed: int = 0):
    """A tiny random model of the set's family (``d_model`` as ``STAND_INS`` says)."""
    import torch
    from transformers import AutoModelForCausalLM

    from featcircuits.testing import tiny_config, tiny_tokenizer

    spec = STAND_INS[set_name]
    tok = tiny_tokenizer()
    config = tiny_config(spec["family"], len(tok), n_layers, spec["d_model"])
    config.intermediate_size = 64  # keeps the 2304-wide Gemma 2 stand-in small
    if "heads" in spec:
        config.num_attention_heads, config.head_dim = spec["heads"]
        config.num_key_value_heads = 1
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return hf, tok


def requested_ids(set_name: str, adapter) -> dict[str, tuple[str, str]]:
    """Site -> (release, sae_id) that the registry's templates produce for ``adapter``."""
    from featcircuits.dictionaries import registry

    entry = registry()[set_name]
    out = {}
    for site in adapter.sites():
        tpl = entry["sites"].get(site.kind)
        if tpl is not None:
            out[site.name] = (tpl["release"], tpl["sae_id"].format(layer=site.layer))
    return out


def _sae_arrays(d_in: int, d_sae: int, seed: int, active: int = 64) -> dict[str, Any]:
    """Encoder/decoder with ``active`` random features (the rest zero, so the 2304 x 16384
    Gemma Scope stand-in compresses to almost nothing and loads in a second)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = min(active, d_sae)
    w_enc = np.zeros((d_in, d_sae), np.float32)
    w_dec = np.zeros((d_sae, d_in), np.float32)
    w_enc[:, :k] = rng.standard_normal((d_in, k)) / np.sqrt(d_in)
    w_dec[:k] = rng.standard_normal((k, d_in)) / np.sqrt(k)
    b_enc = np.zeros(d_sae, np.float32)
    b_dec = (rng.standard_normal(d_in) * 0.01).astype(np.float32)
    threshold = np.full(d_sae, 0.01, np.float32)
    return {"w_enc": w_enc, "w_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold}


def _safetensors_bytes(arrays: dict[str, Any]) -> bytes:
    from safetensors.numpy import save

    return save(arrays)


def write_sae(hub: Path, release: str, sae_id: str, d_in: int, d_sae: int, seed: int) -> bool:
    """Lay out one SAE in its release's real format; False when sae-lens's table lacks it."""
    import io

    import numpy as np
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory or sae_id not in directory[release].saes_map:
        return False
    info = directory[release]
    repo_id, folder = info.repo_id, info.saes_map[sae_id]
    a = _sae_arrays(d_in, d_sae, seed)
    loader = info.conversion_func
    if loader == "gemma_2":  # Gemma Scope: <folder>/params.npz, keys W_enc W_dec b_enc b_dec threshold
        buf = io.BytesIO()
        # an .npz is a zip of .npy files; written at zlib level 1 (np.savez_compressed takes no
        # level and spends ~2 s per mostly-zero 2304 x 16384 stand-in at its default)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
                with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, a[key.lower()], allow_pickle=False)
        put_file(hub, repo_id, f"{folder}/params.npz", buf.getvalue())
    elif loader == "gemma_3":  # Gemma Scope 2: <folder>/params.safetensors, lower-case w_enc/w_dec
        put_file(hub, repo_id, f"{folder}/params.safetensors", _safetensors_bytes(a))
    elif loader is None:  # sae-lens format: <folder>/cfg.json + sae_weights.safetensors
        # A pre-6.0 cfg, as those releases were converted; the hook point is the sae id there.
        layer = int(sae_id.split(".")[1])
        cfg = {"model_name": info.model, "hook_point": sae_id, "hook_point_layer": layer,
               "hook_point_head_index": None, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
               "device": "cpu", "activation_fn_str": "relu", "apply_b_dec_to_input": True,
               "context_size": 128, "prepend_bos": True, "normalize_activations": False}
        put_file(hub, repo_id, f"{folder}/cfg.json", json.dumps(cfg, indent=2).encode())
        weights = {"W_enc": a["w_enc"], "W_dec": a["w_dec"], "b_enc": a["b_enc"], "b_dec": a["b_dec"]}
        put_file(hub, repo_id, f"{folder}/sae_weights.safetensors", _safetensors_bytes(weights))
    else:
        raise ValueError(f"no stand-in format for sae-lens loader {loader!r} (release {release})")
    return True


def build_hub_cache(root: Path, set_name: str, n_layers: int = 2) -> dict[str, Any]:
    """Lay out the model repo and the dictionaries of ``set_name`` under ``root/hub``.

    Returns ``{"hub", "model", "requested", "missing"}``: the cache folder, the model's hub id,
    site -> (release, sae_id) the templates produce, and those sae-lens's table lacks.
    """
    from featcircuits.adapters import adapter_for
    from featcircuits.dictionaries import registry

    hub = Path(root) / "hub"
    model_id = registry()[set_name]["model"]
    hf, tok = stand_in_model(set_name, n_layers)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        put_folder(hub, model_id, Path(tmp))
    adapter = adapter_for(hf.config)
    requested = requested_ids(set_name, adapter)
    missing = []
    written = set()
    for i, (site, (release, sae_id)) in enumerate(requested.items()):
        if (release, sae_id) in written:
            continue
        at_z = STAND_INS[set_name].get("attn_at_z") and site.startswith("attn_")
        d_in = adapter.z_width if at_z else adapter.d_model
        if write_sae(hub, release, sae_id, d_in, STAND_INS[set_name]["d_sae"], seed=i):
            written.add((release, sae_id))
        else:
            missing.append(site)
    return {"hub": hub, "model": model_id, "requested": requested, "missing": missing}


def run_offline(hub: Path, spec: dict[str, Any], env: dict[str, str] | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Run this file as the driver in a fresh process with the hub offline and the cache at ``hub``."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(hub.parent),
                "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    spec_file = hub.parent / "spec.json"
    spec_file.write_text(json.dumps(spec))
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec_file)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def range_server(hub: Path):
    """A local stand-in for the hub's ``/{repo_id}/resolve/main/{file}`` answering HTTP range
    requests from the cache, and the list of paths asked for. Only for the one request that
    sae-lens's ``gemma_3`` loader makes even offline (the safetensors header, to learn the
    shapes); everything else still comes from the cache with ``HF_HUB_OFFLINE=1``."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            asked.append(self.path)
            org, name, _resolve, revision, filename = self.path.lstrip("/").split("/", 4)
            repo = repo_folder(hub, f"{org}/{name}")
            ref = repo / "refs" / revision
            file = repo / "snapshots" / (ref.read_text() if ref.is_file() else revision) / filename
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            start, end = 0, len(data) - 1
            if self.headers.get("Range", "").startswith("bytes="):
                a, _, b = self.headers["Range"][6:].partition("-")
                start, end = int(a), min(int(b), len(data) - 1)
            self.send_response(206 if "Range" in self.headers else 200)
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(data[start:end + 1])

        def log_message(self, *args):  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def _drive(spec: dict[str, Any]) -> int:
    """Run each ``spec["argv"]`` through ``featcircuits.cli.main`` and, with ``spec["dump"]``
    (a result file), write every site's dictionary metadata there: the hook names the loaders
    attached, which the tests compare with the sites."""
    from featcircuits.cli import main

    codes = [main(argv) for argv in spec.get("argv", [])]
    result: dict[str, Any] = {"codes": codes}
    if spec.get("dump"):
        from featcircuits.dictionaries import load_dictionary_set
        from featcircuits.models import load_model

        model = load_model(spec["model"])
        dicts = load_dictionary_set(spec["saes"], model.adapter, spec["model"])
        sites = {}
        for s in model.adapter.sites(dicts.z_sites()):
            d = dicts[s.name]
            cfg = getattr(getattr(d, "sae", None), "cfg", None)
            meta = getattr(cfg, "metadata", None)
            sites[s.name] = {"path": s.path, "reads": s.reads, "source": d.source, "d_in": d.d_in, "d_sae": d.d_sae,
                             "hook_name": getattr(meta, "hook_name", None),
                             "hf_hook_name": getattr(meta, "hf_hook_name", None)}
        result["sites"] = sites
        Path(spec["dump"]).write_text(json.dumps(result, indent=2))
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(_drive(json.loads(Path(sys.argv[1]).read_text())))
