"""``tuner demo --export-hf DIR``: the folder an engine serves computes what the demo computes.

Run as a user would (the CLI in a subprocess), then loaded with ``transformers`` as vLLM loads it: the same
logits on held-out prompts, the same greedy continuation, the same token ids for any text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.cli import ROOT, assert_one_line_error, tuner

torch = pytest.importorskip("torch", reason="the demo model needs torch")

from tuner.demo.export_hf import ALLOWED_TOKEN_IDS, FILES, SPECIAL_TOKENS  # noqa: E402
from tuner.demo.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "demo-hf"
    cp = tuner("demo", "--export-hf", str(out), timeout=180)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == f"tuner demo: Hugging Face Llama model written to {out}"
    assert "vllm.entrypoints.openai.api_server --model" in cp.stderr
    return out


@pytest.fixture(scope="module")
def transformers_():  # type: ignore[no-untyped-def]
    return pytest.importorskip("transformers", reason="loading the export needs transformers (the torch extra)")


def held_out(n: int = 8) -> list[str]:
    from tuner.demo.corpus import held_out_prompts

    return held_out_prompts(n, seed=4242)  # cut from the topics the demo model never trained on


def test_export_writes_every_file_and_a_llama_config(exported: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == sorted(FILES)  # no .partial left
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["rms_norm_eps"]) == (VOCAB_SIZE, 256, 1e-5)
    assert cfg["tie_word_embeddings"] is False
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen == {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}  # no sampling defaults


def test_llama_logits_match_the_demo_model_on_held_out_prompts(exported: Path, transformers_: object) -> None:
    from transformers import LlamaForCausalLM

    from tuner.demo.model import load

    demo = load()
    hf = LlamaForCausalLM.from_pretrained(str(exported))
    hf.eval()
    assert hf.dtype == torch.float32
    tok = ByteTokenizer()
    prompts = held_out()
    assert len(prompts) == 8
    worst = 0.0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tok.encode(p, bos=True)])
            diff = (demo(ids) - hf(ids).logits.float()).abs().max().item()
            worst = max(worst, diff)
    assert worst <= 1e-4, worst


def test_llama_greedy_continuation_equals_the_demo_greedy_ids(exported: Path, transformers_: object) -> None:
    from transformers import LlamaForCausalLM

    from tests.helpers.demo_greedy import demo_greedy

    hf = LlamaForCausalLM.from_pretrained(str(exported))
    hf.eval()
    tok = ByteTokenizer()
    for p in held_out(3):
        ids = tok.encode(p, bos=True)
        want = demo_greedy(ids, 32)
        with torch.inference_mode():
            # the demo never samples BOS/PAD/unused ids: the same restriction as vLLM's allowed_token_ids
            bad = [[i] for i in range(VOCAB_SIZE) if i not in ALLOWED_TOKEN_IDS]
            out = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=32,
                do_sample=False,
                bad_words_ids=bad,
                pad_token_id=PAD,
                eos_token_id=EOS,
            )[0, len(ids) :].tolist()
        assert out == want, (p, tok.decode(out), tok.decode(want))


def test_tokenizer_round_trips_every_byte_and_the_special_tokens(exported: Path, transformers_: object) -> None:
    from tokenizers import decoders
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(exported))
    demo = ByteTokenizer()
    assert len(t) == VOCAB_SIZE
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (BOS, EOS, PAD)
    assert t.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(256, VOCAB_SIZE))
    # ids -> bytes: each of the 256 ids alone is its byte, and all together decode as the demo decodes
    inv = {v: k for k, v in t.get_vocab().items()}
    byte_level = decoders.ByteLevel()
    for b in range(256):
        assert byte_level.decode([inv[b]]) == bytes([b]).decode("utf-8", errors="replace"), b
    allbytes = list(range(256))
    assert t.backend_tokenizer.decode(allbytes, skip_special_tokens=True) == demo.decode(allbytes)
    # text -> ids: strings whose UTF-8 covers every byte a str can hold (0xC0, 0xC1, 0xF5-0xFF never occur)
    samples = [
        bytes(range(128)).decode("ascii"),
        "".join(chr(c) for c in range(0x80, 0x800)),
        "".join(chr(c) for c in range(0x800, 0x10000, 7) if not 0xD800 <= c <= 0xDFFF),
        "".join(chr(c) for c in range(0x10000, 0x110000, 997)),
        "def f(x):\n\treturn x  # héllo ✓ 🙂 <s> </s> <|bos",
        *held_out(),
    ]
    seen: set[int] = set()
    for s in samples:
        ids = t(s)["input_ids"]
        assert ids == demo.encode(s, bos=True), s[:40]  # BOS added, as the demo's prompts start
        assert t(s, add_special_tokens=False)["input_ids"] == demo.encode(s)
        assert t.decode(ids, skip_special_tokens=True) == s
        seen.update(ids)
    assert seen == set(range(257)) - {0xC0, 0xC1} - set(range(0xF5, 0x100))
    # special tokens: their text maps to their id and back
    for i, s in enumerate(SPECIAL_TOKENS):
        assert t(s, add_special_tokens=False)["input_ids"] == [256 + i]
        assert t.decode([256 + i]) == s
    assert t.decode([BOS, 104, 105, EOS], skip_special_tokens=True) == "hi"
    chat = t.apply_chat_template([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)
    assert chat == "<|bos|>a\nb"  # the demo server's chat prompt: BOS + contents joined by newlines
    assert t(chat, add_special_tokens=False)["input_ids"] == demo.encode("a\nb", bos=True)


def test_export_into_a_folder_that_is_not_empty_is_one_line_and_leaves_it_alone(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    cp = tuner("demo", "--export-hf", str(out), timeout=120)
    err = assert_one_line_error(cp)
    assert err == f"tuner: --export-hf {out}: the folder exists and is not empty; give a new or empty one"
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def test_export_onto_a_file_or_under_a_file_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    err = assert_one_line_error(tuner("demo", "--export-hf", str(f), timeout=120))
    assert err == f"tuner: --export-hf {f}: exists and is not a folder"
    err = assert_one_line_error(tuner("demo", "--export-hf", str(f / "sub"), timeout=120))
    assert err.startswith(f"tuner: --export-hf {f / 'sub'}: cannot create the folder ("), err
    assert f.read_text() == "x"


def test_export_into_an_empty_folder_works(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    cp = tuner("demo", "--export-hf", str(out), "--quiet", timeout=180)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


def test_export_where_the_user_cannot_write_or_look_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="tuner-export-"))  # under /tmp: reachable by another user
    base.chmod(0o755)
    ro = base / "ro"
    ro.mkdir(mode=0o755)
    hidden = base / "hidden"
    hidden.mkdir(mode=0o700)
    try:
        if os.geteuid() == 0:  # root writes anywhere: run as 'nobody' into folders root owns
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root and setpriv is not installed")
            cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            ro.chmod(0o555)
            hidden.chmod(0o000)
            cmd = []
        expected = {
            ro: f"tuner: --export-hf {ro}: cannot write (Permission denied); nothing was left there",
            ro / "new": f"tuner: --export-hf {ro / 'new'}: cannot create the folder (Permission denied)",
            hidden / "x": f"tuner: --export-hf {hidden / 'x'}: cannot look into it (Permission denied)",
        }
        for target, want in expected.items():
            cp = subprocess.run(
                [*cmd, sys.executable, "-m", "tuner", "demo", "--export-hf", str(target)],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=base,
                env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"], "HOME": str(base)},
            )
            assert assert_one_line_error(cp) == want
            assert list(ro.iterdir()) == []
    finally:
        hidden.chmod(0o700)
        shutil.rmtree(base)


def test_export_with_serve_is_refused(tmp_path: Path) -> None:
    err = assert_one_line_error(tuner("demo", "--export-hf", str(tmp_path / "x"), "--serve", timeout=120))
    assert err == "tuner: --export-hf writes the model and exits; run --serve separately"
    assert not (tmp_path / "x").exists()
