"""``generate`` / ``superweight generate`` on a tiny model folder and on its packed artifact."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

import superweight as sw
from superweight.cli import app
from superweight.core.errors import SuperweightError
from superweight.quant import RTN, quantize
from superweight.quant.artifact import save_quantized
from superweight.testing.synthetic import byte_tokenizer, tiny_model

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model, tok = tiny_model("LlamaForCausalLM"), byte_tokenizer()
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    tok.chat_template = CHAT
    model.save_pretrained(root / "chat")
    tok.save_pretrained(root / "chat")
    save_quantized(model, tok, quantize(model, RTN(bits=4, group=32)), root / "art")
    return root


def test_generate_is_greedy_decoding_of_the_model(folders):
    lm = sw.load_model(str(folders / "m"))
    got = sw.generate(lm, "hello", max_new_tokens=6)
    ids = lm.tokenizer("hello", return_tensors="pt")["input_ids"]
    ref = lm.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert got.text == lm.tokenizer.decode(ref, skip_special_tokens=True) and got.new_tokens == len(ref)
    assert not got.chat_template and got.prompt_tokens == ids.shape[1] and got.peak_rss_bytes > 0


def test_the_chat_template_is_applied_unless_raw(folders):
    chat = sw.generate(str(folders / "chat"), "hi", max_new_tokens=3)
    raw = sw.generate(str(folders / "chat"), "hi", max_new_tokens=3, raw=True)
    assert chat.chat_template and not raw.chat_template and chat.prompt_tokens == len("<user>hi<assistant>")


def test_sampling_is_seeded_and_bad_values_are_one_line(folders):
    a, b = (sw.generate(str(folders / "m"), "x", max_new_tokens=8, temperature=1.5, seed=3) for _ in range(2))
    assert a.text == b.text
    for kw, message in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(SuperweightError, match=message):
            sw.generate(str(folders / "m"), "x", **kw)


@pytest.mark.parametrize("which", ["m", "art"])
def test_cli_streams_and_prints_speed_and_memory(folders, which):
    res = CliRunner().invoke(app, ["generate", str(folders / which), "--prompt", "hello", "--max-new-tokens", "5", "--raw"])
    assert res.exit_code == 0, res.output
    assert "tokens/s" in res.output and "peak memory" in res.output
    if which == "art":
        assert "weights held packed" in res.output
    lm = sw.load_model(str(folders / which))
    assert sw.generate(lm, "hello", max_new_tokens=5, raw=True).text in res.output

