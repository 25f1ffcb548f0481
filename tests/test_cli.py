"""The command line: each verb on the default model, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from scratchlm.cli import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_info(capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0 and "llama" in out and "576" in out and "chat template" in out


def test_tokenize_with_model_and_with_tokenizer_file(capsys, llama3_tokenizer_path):
    code, out, _ = run(["tokenize", "Hello, world!"], capsys)
    assert code == 0 and json.loads(out.splitlines()[0])
    code, out, _ = run(["tokenize", "--tokenizer", str(llama3_tokenizer_path), "Hello world"], capsys)
    assert code == 0 and json.loads(out.splitlines()[0]) == [9906, 1917]  # tiktoken's ids for Llama 3


def test_generate_greedy(capsys):
    code, out, _ = run(["generate", "The capital of France is", "-n", "8", "--temperature", "0"], capsys)
    assert code == 0 and out.strip()


def test_chat_reads_turns_from_stdin():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "-m", "scratchlm", "chat", "--temperature", "0", "-n", "40"],
                       input="What is the capital of France?\n", capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "Paris" in p.stdout


def test_bench_json(capsys):
    code, out, _ = run(["bench", "--prompt-tokens", "16", "--gen-tokens", "4", "--json"], capsys)
    r = json.loads(out)
    assert code == 0 and set(r) == {"load_s", "prefill_tok_s", "decode_tok_s"} and r["decode_tok_s"] > 0


@pytest.mark.parametrize("args", [
    ["info", "-m", "/no/such/model.gguf"],
    ["generate", "-m", "/no/such/dir", "hi"],
    ["tokenize", "--tokenizer", "/no/such/tokenizer.model", "hi"],
    ["generate", "hi", "--temperature", "-1"],
    ["generate", "hi", "--top-p", "0"],
])
def test_errors_are_one_line(args, capsys):
    code, out, err = run(args, capsys)
    assert code == 1 and err.startswith("scratchlm: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_model_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 10)
    code, _, err = run(["info", "-m", str(bad)], capsys)
    assert code == 1 and err.startswith("scratchlm: error: ") and err.count("\n") == 1
    notgguf = tmp_path / "x.bin"
    notgguf.write_bytes(b"hello")
    code, _, err = run(["info", "-m", str(notgguf)], capsys)
    assert code == 1 and "not a GGUF file" in err


@pytest.mark.parametrize("argv, what", [
    (["generate", "hi", "-n", "zero"], "argument -n/--max-tokens"),
    (["train", "--threads", "0"], "argument --threads"),
    (["finetune", "--rank", "x"], "argument --rank"),
    (["nosuchverb"], "invalid choice"),
])
def test_bad_argument_is_one_line_and_status_1(argv, what, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scratchlm: error: ") and what in err


def test_missing_tokenizer_is_a_one_line_error(tmp_path, capsys):
    import scratchlm
    from scratchlm.errors import PromptError
    from tests.tiny_models import make_hf_llama

    make_hf_llama(tmp_path / "m")
    capsys.readouterr()  # drop transformers' own progress output
    model = scratchlm.load(tmp_path / "m")  # weights alone load: logits need no tokenizer
    assert model.logits([1, 2, 3]).shape == (3, model.config.vocab_size)
    with pytest.raises(PromptError, match="no tokenizer.json"):
        model.generate("hello", max_tokens=2)
    code, _, err = run(["generate", "-m", str(tmp_path / "m"), "hello"], capsys)
    assert code == 1 and "no tokenizer.json" in err and err.count("\n") == 1
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text('{"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 256}')
    code, _, err = run(["info", "-m", str(tmp_path / "meta")], capsys)
    assert code == 1 and err.startswith("scratchlm: error: ") and err.count("\n") == 1
