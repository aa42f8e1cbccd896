"""Adapters found by resolvers when a request names one that is not registered: a local folder, an
S3-compatible store (moto's server, started here) and a folder standing in for the Hugging Face Hub cache."""

from __future__ import annotations

import shutil

import httpx
import pytest

from helpers import make_adapter, make_tiny_model
from loraplex import LLM, AdapterError, LoRARequest, SamplingParams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resolvers")
    model_dir = make_tiny_model(root / "model", family="llama")
    store = root / "store"
    make_adapter(model_dir, store / "qv", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    make_adapter(model_dir, store / "org" / "emb", seed=2, r=4, target_modules=["embed_tokens", "o_proj"])
    return root, model_dir, store


def outputs(llm: LLM, lora) -> list[int]:
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": [5, 17, 33, 99]}], p, lora_request=lora, use_tqdm=False)[0] \
        .outputs[0].token_ids


def make(model_dir, **kw) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", max_loras=2, max_lora_rank=16, num_kv_blocks=32,
               block_size=4, **kw)


def reference(model_dir, store) -> dict:
    llm = make(model_dir)
    return {n: outputs(llm, LoRARequest(n, str(store / n))) for n in ("qv", "org/emb")}


def test_folder_resolver(setup, tmp_path) -> None:
    _, model_dir, store = setup
    want = reference(model_dir, store)
    llm = make(model_dir, lora_resolvers=f"{tmp_path / 'empty'},{store}")
    assert outputs(llm, "qv") == want["qv"] and outputs(llm, "org/emb") == want["org/emb"]
    assert sorted(llm.list_loras()) == ["org/emb", "qv"]
    with pytest.raises(AdapterError, match=r"unknown adapter 'nope': not registered, and no resolver has it"):
        outputs(llm, "nope")
    with pytest.raises(AdapterError, match=r"invalid adapter name|'\.\.' path segments"):
        outputs(llm, "org/../qv")


def test_s3_resolver(setup, tmp_path, monkeypatch) -> None:
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    from server_harness import free_port

    _, model_dir, store = setup
    port = free_port()
    moto = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="adapters")
        for path in (store / "qv").iterdir():
            s3.upload_file(str(path), "adapters", f"team/qv/{path.name}")
        want = reference(model_dir, store)
        llm = make(model_dir, lora_resolvers="s3://adapters/team", lora_cache_dir=str(tmp_path / "cache"))
        assert outputs(llm, "qv") == want["qv"]
        assert (tmp_path / "cache" / "s3" / "adapters" / "team" / "qv" / "adapter_model.safetensors").is_file()
        with pytest.raises(AdapterError, match="no resolver has it"):
            outputs(llm, "missing")
    finally:
        moto.stop()


def test_hub_resolver_from_a_local_hub_cache(setup, tmp_path, monkeypatch) -> None:
    """hf://: the Hub's cache layout (models--org--name/snapshots/<revision>, refs/main), offline."""
    _, model_dir, store = setup
    cache = tmp_path / "hub"
    snap = cache / "models--org--emb" / "snapshots" / "0123abcd"
    shutil.copytree(store / "org" / "emb", snap)
    (cache / "models--org--emb" / "refs").mkdir()
    (cache / "models--org--emb" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    want = reference(model_dir, store)
    llm = make(model_dir, lora_resolvers="hf://", lora_cache_dir=str(cache))
    assert outputs(llm, "org/emb") == want["org/emb"]
    with pytest.raises(AdapterError, match="no resolver has it"):
        outputs(llm, "org/absent")


def test_server_resolves_unregistered_adapters(setup) -> None:
    from server_harness import ENGINE_KW, PROMPT, Server

    _, model_dir, store = setup
    llm = make(model_dir)
    want = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0),
                        lora_request=LoRARequest("qv", str(store / "qv")), use_tqdm=False)[0].outputs[0].text
    s = Server(model_dir, {}, engine_kw={**ENGINE_KW, "lora_resolvers": str(store)})
    try:
        c = s.client()
        got = c.completions.create(model="qv", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        assert got == want and "qv" in {m.id for m in c.models.list().data}
        r = httpx.post(s.url + "/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404 and "no resolver has it" in r.json()["error"]["message"]
    finally:
        s.stop()
