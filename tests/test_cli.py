"""The command line end to end: `jvlm chat` / `python -m jvlm.cli` / `infer.py` as real subprocesses
against one tiny random checkpoint.

Every non-interactive invocation is declared once in ``RUNS`` and started by a session fixture on a
small process pool (each process pays ~2-3 s of torch import), so the tests below only read results.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("jvlm")
JVLM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "jvlm.cli"]  # the console script
CLI = [sys.executable, "-m", "jvlm.cli"]
INFER = [sys.executable, str(REPO / "infer.py")]
# One torch thread per process: several CLI processes share two cores, oversubscribing them costs more.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
EXIT_USAGE, EXIT_ERROR = 2, 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A tiny checkpoint, a few generated images, a corrupt one, an empty directory."""
    from jvlm.testing import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("cli")
    write_tiny_checkpoint(root / "tiny")
    Image.new("RGB", (64, 48), (200, 20, 20)).save(root / "red.png")
    (root / "pics").mkdir()
    for name, colour in (("b.png", (20, 20, 200)), ("a.png", (20, 200, 20))):  # written out of order
        Image.new("RGB", (40, 72), colour).save(root / "pics" / name)
    (root / "corrupt.png").write_bytes(b"this is not a png")
    (root / "empty").mkdir()
    (root / "hf_home").mkdir()
    return root


def runs_table(w: Path) -> dict[str, dict]:
    tiny = str(w / "tiny")
    one = ["-m", tiny, "-i", str(w / "red.png"), "-p", "Describe the image.", "--max-tokens", "8"]
    batch = ["-m", tiny, "-i", str(w / "red.png"), "-i", str(w / "pics" / "*.png"),
             "-p", "What is in the pictures?", "-p", "Which colours?", "--max-tokens", "8"]
    chat = ["chat", "-m", tiny, "-p", "x"]
    return {
        "single_jvlm": dict(cmd=JVLM + ["chat", *one]),
        "single_infer": dict(cmd=INFER + one),
        "batch": dict(cmd=CLI + ["chat", *batch]),
        # the images of "batch" after one -i, as the shell passes an unquoted pics/*.png
        "batch_stream": dict(cmd=INFER + batch[:2] + ["-i", str(w / "red.png"), str(w / "pics" / "a.png"),
                                                      str(w / "pics" / "b.png")] + batch[6:] + ["--stream"]),
        "json": dict(cmd=CLI + ["chat", "-m", tiny, "--json", "--system", "Answer briefly.", "-p", "Hello!",
                                "-p", "Name three colours.", "--max-tokens", "6", "--threads", "1"]),
        "autodetect_stdin": dict(cmd=CLI + ["chat", "--max-tokens", "5"], cwd=tiny, input="Say hi.\n"),
        "logprobs": dict(cmd=CLI + ["chat", "-m", tiny, "--json", "-p", "Hi", "--max-tokens", "3",
                                    "--logprobs", "2"]),
        "choices": dict(cmd=CLI + ["chat", *one[:4], "-p", "Is it red?", "--choices", "yes,no"]),
        "choices_json": dict(cmd=CLI + ["chat", *one[:4], "-p", "Is it red?", "--choices", "yes, no ,maybe",
                                        "--json"]),
        "err_choices": dict(cmd=CLI + [*chat, "--choices", "yes"], code=EXIT_USAGE, word="--choices"),
        "err_logprobs": dict(cmd=CLI + [*chat, "--logprobs", "21"], code=EXIT_USAGE, word="--logprobs"),
        "err_choices_empty": dict(cmd=CLI + [*chat, "--choices", ""], code=EXIT_USAGE, word="--choices"),
        "err_choices_twice": dict(cmd=CLI + [*chat, "--choices", "yes,yes"], code=EXIT_USAGE, word="twice"),
        "err_logprobs_without_json": dict(cmd=CLI + [*chat, "--logprobs", "2"], code=EXIT_USAGE, word="--json"),
        "err_seed": dict(cmd=CLI + [*chat, "--seed", str(2**64)], code=EXIT_USAGE, word="seed"),
        "err_empty_model": dict(cmd=CLI + ["chat", "-m", "", "-p", "x"], code=EXIT_USAGE, word="--model"),
        "write_tiny": dict(cmd=CLI + ["write-tiny", str(w / "written"), "--seed", "0"]),
        "help": dict(cmd=CLI + ["--help"]),
        "help_infer": dict(cmd=INFER + ["--help"]),
        # errors: (command, expected exit code, a word the one-line message must contain)
        "err_missing_image": dict(cmd=INFER + chat[1:] + ["-i", str(w / "missing.png")], code=EXIT_USAGE,
                                  word="missing.png"),
        "err_glob": dict(cmd=CLI + [*chat, "-i", str(w / "pics" / "*.jpeg")], code=EXIT_USAGE, word="*.jpeg"),
        "err_corrupt": dict(cmd=CLI + [*chat, "-i", str(w / "corrupt.png")], code=EXIT_USAGE, word="corrupt.png"),
        "err_url": dict(cmd=CLI + [*chat, "-i", f"http://127.0.0.1:{closed_port()}/x.png"], code=EXIT_USAGE,
                        word="127.0.0.1"),
        "err_not_snapshot": dict(cmd=CLI + ["chat", "-m", str(w / "empty"), "-p", "x"], code=EXIT_ERROR,
                                 word="not a jina-vlm snapshot"),
        "err_offline": dict(cmd=CLI + ["chat", "-p", "x"], cwd=str(w / "empty"), code=EXIT_ERROR,
                            word="jinaai/jina-vlm", env={"HF_HOME": str(w / "hf_home")}),
        "err_bad_flag": dict(cmd=CLI + [*chat, "--max-crops", "0"], code=EXIT_USAGE, word="--max-crops"),
        "err_threads": dict(cmd=CLI + [*chat, "--threads", "0"], code=EXIT_USAGE, word="--threads"),
        "err_bad_temperature": dict(cmd=INFER + chat[1:] + ["--temperature", "-1"], code=EXIT_USAGE,
                                    word="temperature"),
    }


@pytest.fixture(scope="session")
def runs(workdir):
    """name → Future[CompletedProcess]; all started at once on a few workers."""
    def run(spec):
        return subprocess.run(spec["cmd"], cwd=spec.get("cwd", workdir), input=spec.get("input", ""),
                              env={**ENV, **spec.get("env", {})}, capture_output=True, text=True, timeout=120)

    table = runs_table(workdir)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, spec) for name, spec in table.items()}
        yield {name: (table[name], f) for name, f in futures.items()}


def result(runs, name) -> subprocess.CompletedProcess:
    return runs[name][1].result()


def ok(runs, name) -> subprocess.CompletedProcess:
    p = result(runs, name)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr == ""  # no progress bars or notes when stderr is not a terminal
    assert "\x1b" not in p.stdout  # plain text when stdout is not a terminal
    return p


def responses(stdout: str) -> list[str]:
    """The response texts of the printed trees (continuation lines are indented by the tree)."""
    found = re.findall(r"└── Response: (.*?)\nToken usage: ", stdout, flags=re.S)
    return [text.replace("\n    ", "\n") for text in found]


STATS = re.compile(r"Token usage: \d+ tokens \(\d+\.\d% of context\)\nGenerated in \d+\.\d\ds \| \d+\.\d tok/s")


# ---------------------------------------------------------------------------------------- one-shot
def test_single_image_and_infer_py_print_the_same(runs):
    a, b = ok(runs, "single_jvlm"), ok(runs, "single_infer")
    assert a.stdout.startswith("Conversation 1/1\n├── Images\n│   └── ")
    assert "red.png\n├── Prompt: Describe the image.\n└── Response: " in a.stdout
    assert STATS.search(a.stdout)
    assert responses(a.stdout) == responses(b.stdout) and responses(a.stdout)[0].strip()
    strip_timing = re.compile(r"Generated in .*")
    assert strip_timing.sub("", a.stdout) == strip_timing.sub("", b.stdout)


def test_batch_of_prompts_multiple_images_and_glob(runs):
    out = ok(runs, "batch").stdout
    assert out.count("Conversation 1/2\n") == 1 and out.count("Conversation 2/2\n") == 1
    assert out.index("Conversation 1/2") < out.index("What is in the pictures?") < out.index("Conversation 2/2")
    assert out.index("Conversation 2/2") < out.index("Which colours?")
    images = re.findall(r"^│   [├└]── (.*)$", out, flags=re.M)
    assert [Path(p).name for p in images] == ["red.png", "a.png", "b.png"] * 2  # glob expanded and sorted
    assert len(STATS.findall(out)) == 2 and len(responses(out)) == 2


def test_stream_prints_the_same_answers(runs):
    streamed, whole = ok(runs, "batch_stream").stdout, ok(runs, "batch").stdout
    assert "Conversation 1/2" in streamed and "Conversation 2/2" in streamed
    assert responses(streamed) == responses(whole)  # greedy: streaming changes nothing
    images = re.findall(r"^│   [├└]── (.*)$", streamed, flags=re.M)
    assert [Path(p).name for p in images] == ["red.png", "a.png", "b.png"] * 2  # several images after one -i


def test_json_schema_text_only(runs):
    lines = ok(runs, "json").stdout.splitlines()
    assert len(lines) == 2  # one object per conversation and nothing else
    records = [json.loads(line) for line in lines]
    assert [r["conversation"] for r in records] == [1, 2]
    assert [r["prompt"] for r in records] == ["Hello!", "Name three colours."]
    for r in records:
        assert set(r) == {"conversation", "prompt", "images", "text", "finish_reason", "usage", "timings"}
        assert r["images"] == [] and isinstance(r["text"], str)
        assert r["finish_reason"] in ("stop", "length")
        u = r["usage"]
        assert set(u) == {"prompt_tokens", "image_tokens", "completion_tokens", "total_tokens"}
        assert u["image_tokens"] == 0 and 1 <= u["completion_tokens"] <= 6
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert {"prefill_s", "decode_s", "time_to_first_token_s", "total_s", "tokens_per_s"} <= set(r["timings"])


def test_model_autodetected_from_cwd_and_prompt_from_stdin(runs):
    out = ok(runs, "autodetect_stdin").stdout
    assert out.startswith("Conversation 1/1\n├── Prompt: Say hi.\n└── Response: ")  # text only: no Images node
    assert STATS.search(out)


def test_write_tiny(runs, workdir):
    p = ok(runs, "write_tiny")
    written = Path(p.stdout.strip())
    assert written == workdir / "written"
    names = sorted(f.name for f in written.iterdir())
    assert names == sorted(f.name for f in (workdir / "tiny").iterdir())
    for f in written.glob("*.safetensors"):  # same seed, same weights
        assert f.read_bytes() == (workdir / "tiny" / f.name).read_bytes()


def test_help_lists_commands_and_exit_codes(runs):
    top, infer = ok(runs, "help").stdout, ok(runs, "help_infer").stdout
    for command in ("chat", "write-tiny", "serve", "bench"):
        assert command in top
    for text in (top, infer):
        assert "exit codes:" in text and "130" in text
    for flag in ("--model", "--image", "--prompt", "--max-crops", "--max-tokens", "--max-pixels", "--stream",
                 "--temperature", "--top-p", "--seed", "--dtype", "--system", "--json"):
        assert flag in infer
    assert infer.startswith("usage: infer.py")


def test_serve_and_bench_are_imported_only_when_run(monkeypatch):
    from jvlm import cli
    from jvlm.errors import JvlmError

    imported = []

    def missing_module(name):
        imported.append(name)
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    monkeypatch.setattr(cli.importlib, "import_module", missing_module)
    cli.build_parser("chat")  # `jvlm chat` never imports the server (fastapi) or the bench
    assert imported == []
    with pytest.raises(JvlmError, match=r"`jvlm bench` is not available .*jvlm\.bench is missing"):
        cli.build_parser("bench")
    assert imported == ["jvlm.bench"]


@pytest.mark.parametrize("flags, word", [(["-p", "hi", "--temperature", "-1"], "temperature"),
                                         (["-p", "hi", "-i", "missing.png"], "missing.png")])
def test_flag_and_image_errors_come_before_torch_is_imported(tmp_path, flags, word):
    code = ("import sys; from jvlm.cli import main; rc = main(['chat', '-m', 'nowhere', *sys.argv[1:]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, cwd=tmp_path,
                       env=ENV, timeout=60)
    assert p.returncode == 2 and word in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("name", [n for n in runs_table(Path("/x")) if n.startswith("err_")])
def test_errors_are_one_line_with_an_exit_code(runs, name):
    spec, p = runs[name][0], result(runs, name)
    assert p.returncode == spec["code"], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    error_lines = [line for line in p.stderr.splitlines() if "error: " in line]
    assert len(error_lines) == 1 and spec["word"] in error_lines[0], p.stderr
    if name not in ("err_bad_flag", "err_logprobs", "err_threads"):  # argparse adds its usage lines; ours: one
        assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------- interactive
def spawn(workdir, *args):
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", "-m", str(workdir / "tiny"), *args], cwd=str(workdir),
                          env=ENV, encoding="utf-8", timeout=60, dimensions=(50, 200))
    return child


def turn(child, text: str) -> int:
    """Send a prompt, wait for the answer; return the conversation's token count."""
    child.sendline(text)
    child.expect(r"Token usage: (\d+) tokens")
    tokens = int(child.match.group(1))
    child.expect(">>> ")
    return tokens


def test_interactive_session(workdir):
    long = spawn(workdir, "--max-tokens", "4000")  # started first: both load at the same time
    chat = spawn(workdir, "-i", str(workdir / "red.png"), "--max-tokens", "4")

    chat.expect(">>> ")
    first = turn(chat, "What is this?")
    second = turn(chat, "Tell me more.")
    assert second > first  # the history (first question and answer) is part of the prompt
    chat.sendline(f"/image {workdir / 'pics' / 'a.png'}")
    chat.expect("Added image")
    chat.expect(">>> ")
    with_image = turn(chat, "And now?")
    assert with_image - second > 100  # the new image's tokens
    chat.sendline("/clear")
    chat.expect("cleared")
    chat.expect(">>> ")
    cleared = turn(chat, "What is this?")
    assert first < cleared < with_image  # history gone, both images kept
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0

    long.expect(">>> ")
    long.sendline("Tell me a very long story.")
    long.expect("story.\r\n")
    long.expect(r"\S{3}")  # the answer is streaming ...
    time.sleep(0.3)
    long.sendintr()  # ... and Ctrl-C stops it
    long.expect(r"\[interrupted after (\d+) tokens\]")
    assert long.before.strip() and 1 < int(long.match.group(1)) < 4000
    long.expect(r"Token usage: \d+ tokens")
    long.expect(">>> ")  # still in the session
    long.sendintr()  # Ctrl-C at the prompt does not leave either
    long.expect("Ctrl-D")
    long.expect(">>> ")
    long.sendeof()
    long.expect(pexpect.EOF)
    long.close()
    assert long.exitstatus == 0


def test_logprobs_in_json_output(runs):
    record = json.loads(ok(runs, "logprobs").stdout)
    entries = record["logprobs"]
    assert len(entries) == record["usage"]["completion_tokens"]
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"] >= -1e9
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6


def test_choices_print_probabilities_instead_of_generating(runs):
    out = ok(runs, "choices").stdout
    found = dict(re.findall(r"^\s+(yes|no)\s+(\d+\.\d\d)%", out, flags=re.M))
    assert set(found) == {"yes", "no"}
    assert abs(sum(float(v) for v in found.values()) - 100) < 0.02
    assert "Response" not in out
    record = json.loads(ok(runs, "choices_json").stdout)
    assert [c["text"] for c in record["choices"]] == ["yes", "no", "maybe"]
    assert abs(sum(c["probability"] for c in record["choices"]) - 1) < 1e-9
