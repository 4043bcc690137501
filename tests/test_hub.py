"""Hugging Face conventions: ``from_pretrained`` of a Hub model id through the Hub cache (offline), and
``save_pretrained`` → ``from_pretrained`` round trips in the official layout (golden tiny M+ config, fp32, CPU).

The Hub cache is built in ``tmp_path`` in huggingface_hub's own layout (``file_download.hf_hub_download``'s
docstring): ``models--owner--name/{blobs/<id>, snapshots/<commit>/<file> -> ../../blobs/<id>, refs/<revision>}``.
No test reaches the network: ``HfApi`` calls that would are refused unless the Hub is off (then huggingface_hub's own
offline mode answers them).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _golden import GOLDEN, load_state
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file

import mplus
from mplus.checkpoint import memory_state, save_memory
from mplus.config import MPlusConfig
from mplus.memory.serialization import ltm_tensors
from mplus.model import MPlusForCausalLM
from mplus_kernels.testing import assert_close, assert_equal

MODEL_DIR = GOLDEN / "model"
REPO = "mplus-test/tiny-mplus"
COMMIT = "4f0c2a1b7e9d3c5a8b6f1e2d0c9b8a7f6e5d4c3b"  # any 40-hex commit id
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
MPLUS_FIELDS = {"model_type": "mplus", "architectures": ["MPlusForCausalLM"]}  # saved so the Auto classes route it


def _load(path, **kw) -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(
        path, **{"semantics": "reference", "kernels": "reference", "max_length": 64, **kw}
    )


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache: Path, source: Path, *, repo: str = REPO, commit: str = COMMIT, ref: str = "main",
              skip: tuple[str, ...] = (), tree: bool = False) -> Path:  # fmt: skip
    """Put ``source``'s files into the Hub cache ``cache`` as ``repo`` at ``commit`` (``refs/<ref>``): blobs named by
    their git blob id (sha256 for LFS files, as ``*.safetensors`` are), snapshot entries as relative symlinks.
    ``skip``: files left out of the snapshot; ``tree``: also write the tree listing (``trees/<commit>.json``) that
    tells huggingface_hub which files the commit has, so a snapshot missing one is known incomplete."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    listing = {}
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        lfs = f.suffix == ".safetensors"
        blob = hashlib.sha256(data).hexdigest() if lfs else _git_blob_id(data)
        listing[f.name] = {"size": len(data), "blob_id": _git_blob_id(data)}
        if lfs:
            listing[f.name].update(lfs_sha256=blob, lfs_size=len(data))
        if f.name in skip:
            continue
        (storage / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    if tree:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return storage


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """A Hub call that would go online fails the test; offline, huggingface_hub's own offline mode answers it."""
    for name in ("repo_info", "list_repo_tree"):
        original = getattr(HfApi, name)

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            if not hub_constants.is_offline_mode():
                raise AssertionError(f"the test reached for the network (HfApi.{_name})")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(HfApi, name, guarded)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as a process started with it sees it (huggingface_hub reads it once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def golden_logits() -> torch.Tensor:
    return _load(str(MODEL_DIR))(IDS).logits


def _assert_same_weights(a: MPlusForCausalLM, b: MPlusForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert_equal(sa[key], sb[key], name=key)


# ------------------------------------------------------------------------------------------ Hub ids, offline
def test_hub_id_loads_offline_from_cache_dir(tmp_path, offline, golden_logits):
    hub_cache(tmp_path / "hub", MODEL_DIR)
    model = _load(REPO, cache_dir=tmp_path / "hub")
    assert_equal(model(IDS).logits, golden_logits, name="logits of the Hub id")
    _assert_same_weights(model, _load(str(MODEL_DIR)))


def test_hub_id_loads_through_hf_hub_cache(tmp_path, offline, monkeypatch, golden_logits):
    hub_cache(tmp_path / "hub", MODEL_DIR)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import, like HF_HUB_OFFLINE
    assert_equal(_load(REPO)(IDS).logits, golden_logits, name="logits through HF_HUB_CACHE")


def test_hub_id_loads_in_a_fresh_offline_process_through_hf_home(tmp_path, golden_logits):
    """Nothing patched: a new interpreter with HF_HOME and HF_HUB_OFFLINE=1 in its environment (the way a user runs
    it) finds the model in $HF_HOME/hub and never goes online."""
    hub_cache(tmp_path / "home" / "hub", MODEL_DIR)
    out = tmp_path / "logits.safetensors"
    script = (
        "import sys, torch; from safetensors.torch import save_file; from mplus.model import MPlusForCausalLM\n"
        f"m = MPlusForCausalLM.from_pretrained({REPO!r}, semantics='reference', kernels='reference', max_length=64)\n"
        f"save_file({{'logits': m(torch.tensor({IDS.tolist()})).logits}}, {str(out)!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    root = str(Path(mplus.__file__).resolve().parents[1])
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_equal(load_file(str(out))["logits"], golden_logits, name="logits in a fresh offline process")


def test_hub_revisions_resolve_through_refs_and_commits(tmp_path, offline, golden_logits):
    hub_cache(tmp_path / "hub", MODEL_DIR, ref="v1.0")
    for revision in ("v1.0", COMMIT):
        model = _load(REPO, cache_dir=tmp_path / "hub", revision=revision)
        assert_equal(model(IDS).logits, golden_logits, name=f"logits at revision {revision}")
    for revision in ("main", "v2.0", "0" * 40):  # no refs/main here; an uncached tag; an uncached commit
        with pytest.raises(
            ValueError, match=rf"{REPO!r} is neither a local directory nor in the Hub cache.*{revision}"
        ):
            _load(REPO, cache_dir=tmp_path / "hub", revision=revision)


def test_local_files_only_loads_from_the_cache_without_offline_mode(tmp_path, monkeypatch, golden_logits):
    """With the Hub nominally on, ``local_files_only=True`` must reach snapshot_download (else it goes online and
    ``_no_network`` fails the test)."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    hub_cache(tmp_path / "hub", MODEL_DIR)
    model = _load(REPO, cache_dir=tmp_path / "hub", local_files_only=True)
    assert_equal(model(IDS).logits, golden_logits, name="logits with local_files_only")
    with pytest.raises(ValueError, match="'nobody/nothing' is neither a local directory nor in the Hub cache"):
        _load("nobody/nothing", cache_dir=tmp_path / "hub", local_files_only=True)


def test_unknown_hub_id_offline_names_it(tmp_path, offline):
    hub_cache(tmp_path / "hub", MODEL_DIR)
    expected = r"(?s)'nobody/nothing' is neither a local directory nor in the Hub cache.*HF_HUB_OFFLINE"
    with pytest.raises(ValueError, match=expected):
        _load("nobody/nothing", cache_dir=tmp_path / "hub")


def test_incomplete_cached_snapshot_is_refused(tmp_path, offline):
    """The tree listing says the commit has model.safetensors, the snapshot lacks it (an interrupted download)."""
    hub_cache(tmp_path / "hub", MODEL_DIR, skip=("model.safetensors",), tree=True)
    with pytest.raises(
        ValueError, match=rf"(?s){REPO!r} is neither a local directory nor in the Hub cache.*incomplete"
    ):
        _load(REPO, cache_dir=tmp_path / "hub")


def test_hub_id_is_resolved_with_the_hub_keywords(monkeypatch, golden_logits):
    """Online resolution (stood in for): revision, cache_dir, local_files_only and token reach snapshot_download,
    which is asked for config.json and the safetensors files only."""
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(MODEL_DIR)

    monkeypatch.setattr("mplus.checkpoint.hub.snapshot_download", fake_snapshot_download)
    model = _load(REPO, revision="v1.0", cache_dir="/somewhere", token="hf_test")
    assert_equal(model(IDS).logits, golden_logits, name="logits")
    assert calls == [
        (
            REPO,
            {
                "revision": "v1.0",
                "cache_dir": "/somewhere",
                "local_files_only": False,
                "token": "hf_test",
                "allow_patterns": ["*.json", "*.safetensors"],
            },
        )
    ]


def _http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls(f"{status} error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "match"),
    [
        ("RepositoryNotFoundError", rf"{REPO!r} is neither a local directory nor a Hub model this token can read"),
        ("GatedRepoError", r"not found, private or gated: pass token="),
        ("RevisionNotFoundError", rf"the Hub has no {REPO!r} \(revision 'v9'\)"),
        ("HfHubHTTPError", rf"cannot fetch {REPO!r} \(revision 'v9'\) from the Hub: 500 error"),
    ],
)
def test_hub_errors_are_named(monkeypatch, error, match):
    from huggingface_hub import errors

    def failing(repo_id, **kwargs):
        raise _http_error(getattr(errors, error), 404 if error != "HfHubHTTPError" else 500)

    monkeypatch.setattr("mplus.checkpoint.hub.snapshot_download", failing)
    with pytest.raises(ValueError, match=match):
        _load(REPO, revision="v9")


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        (
            "not/a/valid/hub-id",
            ValueError,
            "'not/a/valid/hub-id' is neither a local directory nor a valid Hub model id",
        ),
        ("-bad-/name", ValueError, "'-bad-/name' is neither a local directory nor a valid Hub model id"),
        (str(MODEL_DIR / "config.json"), ValueError, "config.json' is a file, not a checkpoint directory"),
        (Path("/nonexistent/mplus-dir"), ValueError, "'/nonexistent/mplus-dir' is not an existing directory"),
        (None, TypeError, "path must be a checkpoint directory or a Hub model id"),
    ],
)
def test_bad_paths_are_named(offline, path, error, match):
    with pytest.raises(error, match=match):
        _load(path)


# ---------------------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_of_the_golden_model_writes_the_golden_file(tmp_path):
    _load(str(MODEL_DIR)).save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "model.safetensors"]
    saved, golden = (
        load_file(str(tmp_path / "saved" / "model.safetensors")),
        load_file(str(MODEL_DIR / "model.safetensors")),
    )
    assert saved.keys() == golden.keys()
    for key, want in golden.items():
        assert_equal(saved[key], want, name=key)  # the golden dtypes too: ages and recall frequencies float32
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    official = json.loads((MODEL_DIR / "config.json").read_text())
    for key, value in {**official, **MPLUS_FIELDS}.items():
        if key != "transformers_version":
            assert config.get(key, "<missing>") == value, key


def _injected(contexts: int, kernels: str = "reference") -> MPlusForCausalLM:
    model = _load(str(MODEL_DIR), kernels=kernels)
    torch.manual_seed(777)
    for step in range(1, contexts + 1):
        model.inject(load_state(step)["context_ids"])
    return model


def _assert_memory_saved(saved: MPlusForCausalLM, again: MPlusForCausalLM) -> None:
    assert_equal(again.stm.logical("hidden"), saved.stm.logical("hidden"), name="STM rows (logical order)")
    assert_equal(again.stm.age, torch.zeros_like(saved.stm.age), name="STM ages (not in the layout: zero)")
    have, want = ltm_tensors(again.ltm), ltm_tensors(saved.ltm)
    for layer in range(saved.config.num_hidden_layers):
        for prefix in ("ltm.", "ltm_keys.", "ltm_ages.", "ltm_recall_frequencies.", "ltm_k.", "ltm_v."):
            assert_equal(have[f"{prefix}{layer}"], want[f"{prefix}{layer}"], name=f"{prefix}{layer}")
    assert again.ltm.cache_len == 0 and again.ltm.update_step == 0


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_save_pretrained_round_trip_after_injections(tmp_path, kernels):
    """Two injections (update_ltm_frequency = 2): the dropped rows are merged, so the layout holds all the memory a
    forward reads; weights bit-identical, memory equal, logits equal (bit for bit while the STM slots are in logical
    order: the reference update keeps them so, the fused one permutes them)."""
    model = _injected(2, kernels)
    assert model.config.update_ltm_frequency == 2 and model.ltm.cache_len == 0
    model.save_pretrained(str(tmp_path / "saved"))
    again = _load(str(tmp_path / "saved"), kernels=kernels)
    _assert_same_weights(again, model)
    _assert_memory_saved(model, again)
    identity = torch.arange(model.stm.size, dtype=model.stm.order.dtype).expand_as(model.stm.order)
    assert torch.equal(again.stm.order, identity)
    if kernels == "reference":
        assert torch.equal(model.stm.order, identity)
        assert_equal(again(IDS).logits, model(IDS).logits, name="logits after the round trip")
    else:  # the same keys as the saved model's, attended in another slot order: summed in another order
        assert not torch.equal(model.stm.order, identity)
        assert_close(again(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0, name="logits after the round trip")
    assert not torch.allclose(again(IDS).logits, _load(str(MODEL_DIR))(IDS).logits, atol=1e-3), "memory was saved"


def test_save_pretrained_warns_that_the_dropped_row_cache_is_not_saved(tmp_path):
    model = _injected(3)
    assert model.ltm.cache_len > 0
    with pytest.warns(UserWarning, match="dropped since the last merge .* are not saved; save_memory"):
        model.save_pretrained(tmp_path / "saved")
    again = _load(str(tmp_path / "saved"))
    _assert_same_weights(again, model)
    _assert_memory_saved(model, again)  # the merged store; the cache is gone


def test_save_pretrained_memoryllm_round_trip(tmp_path):
    cfg = MPlusConfig.memoryllm_8b(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_tokens=4, num_blocks=5,
                                   lora_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    model = MPlusForCausalLM(cfg, max_length=32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    model.inject(torch.randint(0, 97, (1, 9)))
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert_equal(saved["initialized"], torch.ones(1, dtype=torch.uint8), name="MemoryLLM initialized")
    assert not any(k.startswith("ltm") for k in saved)
    again = MPlusForCausalLM.from_pretrained(str(tmp_path / "saved"), max_length=32)
    expected = {**model.config.to_dict(), "dtype": "float32", "architectures": ["MPlusForCausalLM"]}
    assert again.ltm is None and again.config.to_dict() == expected
    _assert_same_weights(again, model)
    assert_equal(again.stm.logical("hidden"), model.stm.logical("hidden"), name="STM rows")
    assert_close(again(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0, name="reloaded logits")


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "saved"
    _load(str(MODEL_DIR)).save_pretrained(directory)
    before = {name: (directory / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("mplus.checkpoint.official.save_file", half_written)
    with pytest.raises(OSError, match=f"save_pretrained: cannot write {directory}: OSError: disk full"):
        _injected(2).save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"], "no temporary file is left"
    assert {name: (directory / name).read_bytes() for name in before} == before
    assert _load(str(directory)).ltm.size == [20, 20, 20]


def test_saved_directory_takes_a_memory_file_and_loads_through_the_hub(tmp_path, offline):
    """``model.safetensors`` is the weights file when present (a ``save_memory`` file beside it is not read), and a
    saved directory is a Hub snapshot like any other."""
    model = _injected(2)
    model.save_pretrained(tmp_path / "saved")
    save_memory(model, str(tmp_path / "saved" / "memory.safetensors"))
    again = _load(str(tmp_path / "saved"))
    (tmp_path / "saved" / "memory.safetensors").unlink()
    hub_cache(tmp_path / "hub", tmp_path / "saved")
    from_hub = _load(REPO, cache_dir=tmp_path / "hub")
    assert_equal(from_hub(IDS).logits, again(IDS).logits, name="saved directory through the Hub cache")


def test_sharded_checkpoint_loads_through_its_index(tmp_path, golden_logits):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_bytes((MODEL_DIR / "config.json").read_bytes())
    assert_equal(_load(str(tmp_path))(IDS).logits, golden_logits, name="logits of the sharded checkpoint")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists shards that are not in .*model-00002-of-00002"):
        _load(str(tmp_path))


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("meta", ValueError, "save_pretrained: the model is on the meta device"),
        ("pickle", ValueError, "safe_serialization=False: mplus writes safetensors only"),
        ("shards", ValueError, "max_shard_size='5GB': mplus writes one model.safetensors"),
        ("into a file", ValueError, "is a file, not a directory"),
        ("None", TypeError, "save_directory must be a path"),
    ],
)
def test_save_pretrained_bad_input(tmp_path, how, error, match):
    model = _load(str(MODEL_DIR))
    target, kwargs = tmp_path / "saved", {}
    if how == "meta":
        model = model.to("meta")
    elif how == "pickle":
        kwargs = {"safe_serialization": False}
    elif how == "shards":
        kwargs = {"max_shard_size": "5GB"}
    elif how == "into a file":
        target.write_text("x")
    elif how == "None":
        target = None
    before = {k: v.clone() for k, v in memory_state(model).items()} if how != "meta" else None
    with pytest.raises(error, match=match):
        model.save_pretrained(target, **kwargs)
    assert how == "into a file" or not (tmp_path / "saved").exists()
    if before is not None:
        after = memory_state(model)
        for key in before:
            if key != "rng.cpu":
                assert_equal(after[key], before[key], name=key)
