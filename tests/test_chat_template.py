"""Chat templates: loading one (file or inline Jinja), rendering conversations with it, LLM.chat(chat_template=),
the errors, and the template the embedded demo model ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_tiny_model, make_tokenizer
from loraplex import LLM, InvalidRequestError, SamplingParams
from loraplex.demo import CHAT_TEMPLATE as DEMO_TEMPLATE
from loraplex.demo import MODEL_DIR
from loraplex.multimodal.chat import load_chat_template, render_chat

# Renders [user "hi"] as "user: hi\nassistant:" (with the generation prompt).
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "The quick brown fox"}]
BY_HAND = "system: be brief\nuser: The quick brown fox\nassistant:"
NO_TEMPLATE = ("the model folder has no chat template; pass chat_template= (LLM.chat) or --chat-template "
               "(loraplex serve), or send plain prompts")


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory) -> str:
    """A tiny Llama folder without a chat template."""
    folder = Path(make_tiny_model(tmp_path_factory.mktemp("chat") / "model", family="llama"))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture(scope="module")
def llm(bare_model: str) -> LLM:
    return LLM(bare_model, dtype="float32", device="cpu", num_kv_blocks=64, block_size=4, seed=0)


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


# ---- load_chat_template ----------------------------------------------------------------------------

def test_load_from_a_file_and_inline(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE + "\n# \u00e9\n", encoding="utf-8")
    assert load_chat_template(str(path)) == TEMPLATE + "\n# \u00e9\n"
    assert load_chat_template(TEMPLATE) == TEMPLATE
    assert load_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"


def test_load_accepts_hugging_face_syntax() -> None:
    # Hub templates use loop controls and transformers' {% generation %} block.
    text = ("{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
            "{% else %}{{ m['content'] }}{% endif %}{% if loop.index > 8 %}{% break %}{% endif %}{% endfor %}")
    assert load_chat_template(text) == text


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jinja")
    with pytest.raises(ValueError, match=r"nope\.jinja.*no such file, and not an inline Jinja template"):
        load_chat_template(missing)
    with pytest.raises(ValueError, match="'chatml'.*no such file"):
        load_chat_template("chatml")
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=r"empty\.jinja.* is empty"):
        load_chat_template(str(empty))
    with pytest.raises(ValueError, match="is a folder"):
        load_chat_template(str(tmp_path))
    latin = tmp_path / "latin.jinja"
    latin.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jinja.* not UTF-8"):
        load_chat_template(str(latin))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ bos_token }}\n{% for m in messages %}{{ m['content'] }}\n")  # no endfor
    with pytest.raises(ValueError, match=r"bad\.jinja.* does not compile: line \d+: .*endfor"):
        load_chat_template(str(bad))
    with pytest.raises(ValueError, match=r"inline chat template does not compile: line 2: .*"):
        load_chat_template("{{ messages }}\n{{ messages[0] }")


# ---- render_chat ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()  # carries the test helpers' own chat template


def test_render_with_an_explicit_template_overrides_the_folders(tok) -> None:
    assert tok.chat_template and tok.chat_template != TEMPLATE
    ids, images = render_chat(tok, MSGS, chat_template=TEMPLATE)
    assert ids == tok(BY_HAND, add_special_tokens=False)["input_ids"] and images == []
    ids, _ = render_chat(tok, MSGS, add_generation_prompt=False, chat_template=TEMPLATE)
    assert ids == tok(BY_HAND.removesuffix("assistant:"), add_special_tokens=False)["input_ids"]
    own, _ = render_chat(tok, MSGS)
    assert own == list(tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert own != ids


def test_render_splits_images_out(tok) -> None:
    url = "data:image/png;base64,AAAA"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "image_url", "image_url":
                                                                                {"url": url}}]}]
    ids, images = render_chat(tok, msgs, chat_template=TEMPLATE, image_placeholder="<img>")
    assert images == [url] and ids == tok("user: look <img>\nassistant:", add_special_tokens=False)["input_ids"]


def test_render_errors(tok) -> None:
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(InvalidRequestError) as e:
        render_chat(bare, MSGS)
    assert str(e.value) == NO_TEMPLATE
    with pytest.raises(InvalidRequestError, match=r"message 1: content is not valid Unicode: lone surrogate "
                                                  r"U\+D800 at character 2"):
        render_chat(tok, [MSGS[0], {"role": "user", "content": "ab\ud800"}])
    with pytest.raises(InvalidRequestError, match=r"message 0: content\[1\]\.text is not valid Unicode"):
        render_chat(tok, [{"role": "user", "content": [{"type": "text", "text": "ok"},
                                                         {"type": "text", "text": "\udfff"}]}])
    with pytest.raises(InvalidRequestError, match="message 0 is a str"):
        render_chat(tok, ["hello"])
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        render_chat(tok, [])
    with pytest.raises(InvalidRequestError, match="template line 2: .*no element 5"):
        render_chat(tok, MSGS, chat_template="{{ bos_token }}\n{{ messages[5]['content'] }}")
    refusing = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="first message must be user"):
        render_chat(tok, MSGS, chat_template=refusing)


# ---- LLM.chat ---------------------------------------------------------------------------------------

def test_chat_with_a_template_equals_generate_on_the_rendered_prompt(llm: LLM, tmp_path: Path) -> None:
    assert not llm.get_tokenizer().chat_template
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    direct = llm.generate(BY_HAND, greedy(), use_tqdm=False)[0]
    for template in (TEMPLATE, str(path)):
        out = llm.chat(MSGS, greedy(), use_tqdm=False, chat_template=template)[0]
        assert out.prompt_token_ids == direct.prompt_token_ids
        assert out.outputs[0].token_ids == direct.outputs[0].token_ids and out.outputs[0].text == direct.outputs[0].text


def test_chat_without_any_template_says_how_to_give_one(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError) as e:
        llm.chat(MSGS, greedy(), use_tqdm=False)
    assert str(e.value) == NO_TEMPLATE
    with pytest.raises(ValueError, match="no such file"):
        llm.chat(MSGS, greedy(), use_tqdm=False, chat_template="missing.jinja")


# ---- the demo model ---------------------------------------------------------------------------------

def test_demo_model_ships_its_template() -> None:
    from transformers import AutoTokenizer

    assert (MODEL_DIR / "chat_template.jinja").read_text(encoding="utf-8") == DEMO_TEMPLATE
    assert AutoTokenizer.from_pretrained(str(MODEL_DIR)).chat_template == DEMO_TEMPLATE
    assert load_chat_template(DEMO_TEMPLATE) == DEMO_TEMPLATE


def test_demo_rebuild_writes_the_template(tmp_path: Path) -> None:
    from loraplex.demo import train
    from loraplex.demo.text import load_corpus

    train.train_tokenizer(load_corpus()[:50], train.QUICK, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == DEMO_TEMPLATE


def test_demo_model_chats_like_it_completes() -> None:
    llm = LLM(str(MODEL_DIR), dtype="float32", device="cpu", seed=0)
    tok = llm.get_tokenizer()
    conv = [{"role": "system", "content": "A lawyer is a person who takes money."},
            {"role": "user", "content": [{"type": "text", "text": "Every night the machine "}]}]
    text = tok.apply_chat_template(conv[:1] + [{"role": "user", "content": "Every night the machine "}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "A lawyer is a person who takes money.\nEvery night the machine"
    params = SamplingParams(max_tokens=12, temperature=0.0)
    chats = llm.chat([conv, [{"role": "user", "content": "Every night the machine"}]], params, use_tqdm=False)
    completions = llm.generate([text, "Every night the machine"], params, use_tqdm=False)
    for chat, completion in zip(chats, completions):
        assert chat.prompt_token_ids == completion.prompt_token_ids
        assert chat.outputs[0].text == completion.outputs[0].text and chat.outputs[0].text.strip()
