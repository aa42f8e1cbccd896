"""Adapter folders confined to a root (every file read resolves inside it, re-reads included) and the adapter
name rule (``validate_adapter_name``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import load_base_model, make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import AdapterError
from loraplex.lora.adapter import load_adapter
from loraplex.lora.pool import MAX_ADAPTER_NAME_LEN, validate_adapter_name
from test_adapter import spec_from_model

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
OUTSIDE = "resolves outside the allowed root"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("root_model") / "llama", family="llama", seed=0)


@pytest.fixture(scope="module")
def spec(model_dir):
    return spec_from_model(load_base_model(model_dir))


@pytest.fixture(scope="module")
def source(model_dir, tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("root_sources")
    return {n: make_adapter(model_dir, base / n, seed=s, r=4) for n, s in (("a", 1), ("b", 2), ("c", 3))}


def layout(tmp_path: Path, src: str) -> tuple[Path, Path, Path]:
    """``root/ad`` (a copy of ``src``) and ``outside`` (another copy, beside the root)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(src, root / "ad")
    shutil.copytree(src, outside)
    return root, root / "ad", outside


def relink(folder: Path, name: str, target: Path) -> None:
    (folder / name).unlink()
    (folder / name).symlink_to(target)


def load(path, spec, root, name="ad"):
    return load_adapter(name, str(path), spec, 64, root=None if root is None else str(root))


# ---- confinement in the reader ---------------------------------------------------------------------------------
@pytest.mark.parametrize("file", [WEIGHTS, CONFIG])
def test_file_symlinked_outside_the_root_refused(spec, source, tmp_path, file):
    root, ad, outside = layout(tmp_path, source["a"])
    relink(ad, file, outside / file)
    with pytest.raises(AdapterError, match=rf"adapter 'ad' .*: {file} {OUTSIDE}") as info:
        load(ad, spec, root)
    assert str(outside) not in str(info.value)  # the target beyond the root is not shown
    assert load(ad, spec, None).modules  # without a root the same folder still loads (the offline default)


def test_dangling_symlink_outside_refused_before_any_read(spec, source, tmp_path):
    root, ad, outside = layout(tmp_path, source["a"])
    relink(ad, WEIGHTS, outside / "no-such-file")
    with pytest.raises(AdapterError, match=rf"{WEIGHTS} {OUTSIDE}"):
        load(ad, spec, root)


def test_symlinks_inside_the_root_accepted(spec, source, tmp_path):
    root, ad, outside = layout(tmp_path, source["a"])
    shutil.copytree(source["a"], root / "store")
    relink(ad, WEIGHTS, root / "store" / WEIGHTS)  # absolute in-root link
    relink(ad, CONFIG, Path("..", "store", CONFIG))  # relative in-root link
    (root / "alias").symlink_to(ad, target_is_directory=True)  # a linked folder inside the root
    want = load(ad, spec, None)
    for path in (ad, root / "alias"):
        got = load(path, spec, root)
        assert sorted(got.modules) == sorted(want.modules)
        assert all(got.modules[m].A.equal(want.modules[m].A) for m in want.modules)


def test_root_given_through_a_symlink(spec, source, tmp_path):
    root, ad, _ = layout(tmp_path, source["a"])
    (tmp_path / "root_link").symlink_to(root, target_is_directory=True)
    assert load(tmp_path / "root_link" / "ad", spec, tmp_path / "root_link").modules


def test_folder_outside_the_root_refused(spec, source, tmp_path):
    root, ad, outside = layout(tmp_path, source["a"])
    (root / "escape").symlink_to(outside, target_is_directory=True)
    for path in (outside, root / "escape", root / "ad" / ".." / ".." / "outside"):
        with pytest.raises(AdapterError, match=f"the adapter folder {OUTSIDE}"):
            load(path, spec, root)
    with pytest.raises(AdapterError, match=f"the adapter folder {OUTSIDE}"):  # no probing outside the root
        load(tmp_path / "nowhere", spec, root)
    # a sibling whose name starts with the root's name is not inside it
    shutil.copytree(source["a"], tmp_path / "root2")
    with pytest.raises(AdapterError, match=OUTSIDE):
        load(tmp_path / "root2", spec, root)


# ---- confinement through the pool and the engine ---------------------------------------------------------------
def make_llm(model_dir: str, **kw) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", max_lora_rank=16, num_kv_blocks=64, block_size=4, seed=0,
               **kw)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


PROMPT = {"prompt_token_ids": [5, 17, 33, 99]}


def test_register_with_root_refuses_outside_symlink(model_dir, source, tmp_path):
    root, ad, outside = layout(tmp_path, source["a"])
    relink(ad, WEIGHTS, outside / WEIGHTS)
    eng = make_llm(model_dir).engine
    with pytest.raises(AdapterError, match=rf"adapter 'ad' .*{WEIGHTS} {OUTSIDE}"):
        eng.add_lora(LoRARequest("ad", str(ad)), root=str(root))
    assert eng.list_loras() == []
    with pytest.raises(AdapterError, match=rf"{WEIGHTS} {OUTSIDE}"):
        eng.pool.read(LoRARequest("ad", str(ad)), root=str(root))


@pytest.mark.parametrize("confined", [True, False])
def test_reread_after_host_eviction_is_confined(model_dir, source, tmp_path, confined):
    root, ad, outside = layout(tmp_path, source["a"])
    llm = make_llm(model_dir, max_loras=1, max_cpu_loras=1)
    eng = llm.engine
    eng.add_lora(LoRARequest("ad", str(ad)), root=str(root) if confined else None)
    eng.add_lora(LoRARequest("other", source["b"]))  # evicts "ad" from host memory (capacity 1)
    assert eng.pool.host_resident == ["other"]
    llm.generate(PROMPT, greedy(2), lora_request="other", use_tqdm=False)  # the one slot now holds "other"
    assert eng.pool.device_resident == ["other"]
    relink(ad, WEIGHTS, outside / WEIGHTS)  # swapped after registration: the next re-read must catch it
    if not confined:  # an unconfined registration follows the link (as before)
        assert len(llm.generate(PROMPT, greedy(2), lora_request="ad", use_tqdm=False)[0].outputs[0].token_ids) == 2
        return
    with pytest.raises(AdapterError, match=rf"adapter 'ad' .*{WEIGHTS} {OUTSIDE}"):
        eng.add_request(PROMPT, greedy(2), "ad")
    with pytest.raises(AdapterError, match=OUTSIDE):
        llm.generate(PROMPT, greedy(2), lora_request="ad", use_tqdm=False)
    assert not eng.has_unfinished_requests()
    relink(ad, WEIGHTS, root / "ad_weights")  # an in-root link is fine again
    shutil.copy(outside / WEIGHTS, root / "ad_weights")
    assert len(llm.generate(PROMPT, greedy(2), lora_request="ad", use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_root_kept_by_noop_register_dropped_by_unregister(model_dir, source, tmp_path):
    root, ad, outside = layout(tmp_path, source["a"])
    llm = make_llm(model_dir, max_loras=1, max_cpu_loras=1)
    eng = llm.engine
    eng.add_lora(LoRARequest("ad", str(ad)), root=str(root))
    eng.add_lora(LoRARequest("ad", str(ad)))  # same path, no reload: a no-op that keeps the root
    eng.add_lora(LoRARequest("other", source["b"]))
    llm.generate(PROMPT, greedy(2), lora_request="other", use_tqdm=False)
    relink(ad, CONFIG, outside / CONFIG)
    with pytest.raises(AdapterError, match=rf"{CONFIG} {OUTSIDE}"):
        eng.add_request(PROMPT, greedy(2), "ad")
    eng.remove_lora("ad")  # forgets the root with the name
    eng.add_lora(LoRARequest("ad", str(ad)))
    assert len(llm.generate(PROMPT, greedy(2), lora_request="ad", use_tqdm=False)[0].outputs[0].token_ids) == 2


# ---- adapter names ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "7", "org/name-v1.2_x", "A.b_c-d/e", "x" * MAX_ADAPTER_NAME_LEN])
def test_valid_names(name):
    validate_adapter_name(name)


@pytest.mark.parametrize("name", ["x" * (MAX_ADAPTER_NAME_LEN + 1), "x" * 8000, "base:ad", "ad@v1", "my ad", " ad",
                                  ".ad", "_ad", "-ad", "/ad", "ad\n", "ad\\x", "é", "ad\x00", ""])
def test_invalid_names(name):
    with pytest.raises(AdapterError, match=r"invalid adapter name .*at most 256 characters.*letter or digit") as info:
        validate_adapter_name(name)
    msg = str(info.value)
    assert f"({len(name)} characters)" in msg
    assert len(msg) < 300  # a long name is shown truncated
    assert repr(name if len(name) <= 40 else name[:40] + "...") in msg


def test_register_enforces_the_name_rule(model_dir, source):
    llm = make_llm(model_dir)
    ok = "n" * MAX_ADAPTER_NAME_LEN
    llm.add_lora(LoRARequest(ok, source["a"]))
    llm.add_lora(LoRARequest("org/name-v1.2_x", source["b"]))
    for bad in ("n" * (MAX_ADAPTER_NAME_LEN + 1), "base:ad", "ad@v1", "my ad", ".hidden"):
        with pytest.raises(AdapterError, match=r"invalid adapter name .*\(\d+ characters\)"):
            llm.add_lora(LoRARequest(bad, source["c"]))
        with pytest.raises(AdapterError, match="invalid adapter name"):
            llm.engine.pool.read(LoRARequest(bad, source["c"]))
    assert llm.engine.list_loras() == sorted([ok, "org/name-v1.2_x"])
    outs = llm.generate([PROMPT, PROMPT], greedy(2), lora_request=[LoRARequest(ok, source["a"]), "org/name-v1.2_x"],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]


def test_reread_keeps_the_hash_of_unchanged_files_and_hashes_rewritten_ones(model_dir, source, tmp_path,
                                                                          monkeypatch):
    """A re-read after host eviction finds the same files unmodified (device, inode, size, mtime): it keeps the
    content hash instead of hashing the weights again, skips the finiteness check they passed, and serves what
    the first read served. Weights rewritten in place (same size, new content) are checked and hashed: a new
    version."""
    from loraplex.lora import adapter as adapter_mod

    hashed, checked = [], []
    real_hash, real_check = adapter_mod._content_hash, adapter_mod._check_finite
    monkeypatch.setattr(adapter_mod, "_content_hash", lambda cfg, t: hashed.append(1) or real_hash(cfg, t))
    monkeypatch.setattr(adapter_mod, "_check_finite", lambda w, t: checked.append(1) or real_check(w, t))
    ad = tmp_path / "ad"
    shutil.copytree(source["a"], ad)
    llm = make_llm(model_dir, max_loras=1, max_cpu_loras=1)
    eng = llm.engine
    eng.add_lora(LoRARequest("ad", str(ad)))
    first = llm.generate(PROMPT, greedy(4), lora_request="ad", use_tqdm=False)[0].outputs[0].token_ids
    version = eng.pool.version_of("ad")
    eng.add_lora(LoRARequest("other", source["b"]))  # evicts "ad" from host memory (capacity 1) ...
    llm.generate(PROMPT, greedy(2), lora_request="other", use_tqdm=False)  # ... and from the one slot
    assert eng.pool.needs_read("ad") and len(hashed) == 2
    again = llm.generate(PROMPT, greedy(4), lora_request="ad", use_tqdm=False)[0].outputs[0].token_ids
    assert again == first and eng.pool.version_of("ad") == version
    assert len(hashed) == len(checked) == 2
    assert [e[1] for e in eng.pool.drain_events() if e[0] == "ad"].count("read") == 1

    llm.generate(PROMPT, greedy(2), lora_request="other", use_tqdm=False)  # "ad" out of memory again
    assert eng.pool.needs_read("ad")
    shutil.copy(Path(source["c"]) / WEIGHTS, ad / WEIGHTS)  # in place: same shapes and size, other values
    llm.generate(PROMPT, greedy(2), lora_request="ad", use_tqdm=False)
    assert eng.pool.version_of("ad") != version
    assert len(hashed) == len(checked) == 3  # "other" was re-read as it was; "ad" was checked and hashed
