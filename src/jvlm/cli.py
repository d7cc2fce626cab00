"""The command line: ``jvlm chat | serve | bench | write-tiny``; ``infer.py`` is ``jvlm chat``.

A thin face over the library: expand the image arguments, build conversations, call ``jvlm.load``
and ``VLM.chat`` (``prepare`` + ``submit`` in the interactive loop), print. Library errors are typed,
so each becomes one ``error: ...`` line and an exit code here, at the edge.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from jvlm.errors import InvalidRequestError, JvlmError
from jvlm.hub import DEFAULT_MODEL

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = """exit codes:
  0    success
  1    runtime or model error (model not found or not a jina-vlm snapshot, generation failed)
  2    usage or bad input (bad flags, a glob that matches nothing, an image that cannot be read)
  130  interrupted (Ctrl-C)"""
BRANCH, LAST, PIPE, SPACE = "├── ", "└── ", "│   ", "    "
# Subcommands owned by other modules, imported only when run (so `jvlm chat` never imports fastapi).
PLUGINS = {
    "serve": ("jvlm.server.cli", "add_serve_arguments", "serve_main", "serve an OpenAI-compatible HTTP API"),
    "bench": ("jvlm.bench", "add_bench_arguments", "bench_main", "measure latency and throughput"),
}


class UsageError(Exception):
    """Bad command-line input found by the CLI itself (exit code 2)."""


# ---------------------------------------------------------------------------------------- arguments
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def top_logprobs_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 20, got {text!r}") from None
    if not 0 <= value <= 20:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 20, got {value}")
    return value


def parse_choices(text: str) -> list[str]:
    choices = [c.strip() for c in text.split(",")]
    if len(choices) < 2 or not all(choices):
        raise UsageError(f"--choices needs at least two non-empty, comma-separated answers, got {text!r}")
    if len(set(choices)) < len(choices):
        raise UsageError(f"--choices lists an answer twice: {text!r}")
    return choices


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="snapshot directory or hub id (default: the current directory when it "
                   f"holds config.json, else {DEFAULT_MODEL} from the Hugging Face cache)")
    p.add_argument("-i", "--image", action="extend", nargs="+", default=[], metavar="IMAGE",
                   help="image path, http(s) URL or glob pattern (sorted); several after one -i (an unquoted "
                        "*.jpg the shell expanded) or -i repeated")
    p.add_argument("-p", "--prompt", action="append", default=[],
                   help="a prompt; repeat for several conversations over the same images, run as one batch. "
                   "Without -p: an interactive chat on a terminal, else the prompt is read from stdin")
    p.add_argument("--system", help="system message for every conversation")
    p.add_argument("--max-crops", type=positive_int, default=12, help="image tiles per image (default: 12)")
    p.add_argument("--max-pixels", type=positive_int, help="downscale images above this many pixels")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="new tokens per answer (default: 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "int8"), default="float32",
                   help="weight format: float32 (reference numerics), bfloat16, or int8 (fastest; see README)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the physical cores)")
    p.add_argument("--stream", action="store_true", help="print answers token by token")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per conversation (text, usage, timings) and nothing else")
    p.add_argument("--logprobs", type=top_logprobs_count, metavar="N",
                   help="add per-token log-probabilities (and the N most likely alternatives, 0-20) to --json output")
    p.add_argument("--choices", metavar="A,B,...",
                   help="score these comma-separated candidate answers and print each one's probability "
                        "instead of generating (e.g. --choices yes,no)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let -i URLs point at loopback / private / link-local addresses (refused by default)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The ``jvlm`` parser; ``command`` (the subcommand about to run) decides which plugin gets imported."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="jvlm", description="Run jina-vlm on this machine.", epilog=EXIT_CODES,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chat = sub.add_parser("chat", help="ask about images (one shot, batched prompts, or interactive)",
                          description="Ask jina-vlm about images.", epilog=EXIT_CODES, formatter_class=fmt)
    add_chat_arguments(chat)
    chat.set_defaults(func=chat_main)
    tiny = sub.add_parser("write-tiny", help="write a tiny random checkpoint (tests, offline demos)",
                          epilog=EXIT_CODES, formatter_class=fmt)
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=write_tiny_main)
    for name, (_, add_arguments, main_function, help_text) in PLUGINS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = load_plugin(name)
            getattr(module, add_arguments)(p)
            p.set_defaults(func=getattr(module, main_function))
    return parser


def load_plugin(name: str):
    module_name = PLUGINS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise JvlmError(f"`jvlm {name}` is not available in this installation ({module_name} is missing)") from None
        raise JvlmError(f"`jvlm {name}` needs the module '{e.name}', which is not installed") from None
    except Exception as e:  # a broken plugin must not take `jvlm chat` down with it
        raise JvlmError(f"`jvlm {name}` could not be loaded: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------- output
class Output:
    """Styled with rich on a terminal, plain text (no ANSI codes) otherwise; flushed on every write."""

    def __init__(self, file=None):
        self.file = file or sys.stdout
        self.console = Console(file=self.file, highlight=False, soft_wrap=True, emoji=False) \
            if self.file.isatty() else None

    def __call__(self, *parts: str | tuple[str, str], end: str = "\n") -> None:
        text = Text.assemble(*parts)
        if self.console is not None:
            self.console.print(text, end=end)
        else:
            self.file.write(text.plain + end)
        self.file.flush()


class StderrProgress:
    """Transient progress bars on stderr, shown only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.console = Console(stderr=True)
        self.bar: Progress | None = None
        self.images = 0

    def show(self, label: str, done: int, total: int, unit: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            count = [DownloadColumn()] if unit == "bytes" else [MofNCompleteColumn(), TextColumn(unit)]
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), *count, TimeElapsedColumn(),
                                console=self.console, transient=True, redirect_stdout=False, redirect_stderr=False)
            self.bar.add_task(label, total=total)
            self.bar.start()
        self.bar.update(self.bar.task_ids[0], completed=done, total=total, description=label)
        if done >= total:
            self.stop()

    def loading(self, done: int, total: int) -> None:
        self.show("Loading weights", done, total, "bytes")

    def vision(self, done: int, total: int) -> None:
        self.show(f"Encoding image {self.images + 1}", done, total, "crops")
        if done >= total:
            self.images += 1

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(Text(message, style="dim"))


def print_images(out: Output, labels: list[str], prefix: str = "", last: bool = False) -> None:
    out(prefix + (LAST if last else BRANCH), ("Images", "bold"))
    for k, label in enumerate(labels):
        out(prefix + (SPACE if last else PIPE) + (LAST if k == len(labels) - 1 else BRANCH), label)


def print_header(out: Output, i: int, n: int, labels: list[str], prompt: str, response: bool = True) -> None:
    out((f"Conversation {i + 1}/{n}", "bold cyan"))
    if labels:
        print_images(out, labels)
    out(BRANCH, ("Prompt: ", "bold"), prompt.replace("\n", "\n" + PIPE))
    if response:
        out(LAST, ("Response: ", "bold green"), end="")


def print_response(out: Output, text: str) -> None:
    if text:
        out(text.replace("\n", "\n" + SPACE), end="")


def print_stats(out: Output, result, context_length: int) -> None:
    usage, timings = result.usage, result.timings
    share = 100 * usage.total_tokens / context_length
    out((f"Token usage: {usage.total_tokens} tokens ({share:.1f}% of context)", "dim"))
    out((f"Generated in {timings.total_s:.2f}s | {result.tokens_per_s:.1f} tok/s", "dim"))


def json_record(i: int, prompt: str, labels: list[str], result) -> dict:
    u = result.usage
    record = {"conversation": i + 1, "prompt": prompt, "images": labels, "text": result.text,
              "finish_reason": result.finish_reason,
              "usage": {"prompt_tokens": u.prompt_tokens, "image_tokens": u.image_tokens,
                        "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens},
              "timings": {**asdict(result.timings), "tokens_per_s": result.tokens_per_s}}
    if result.logprobs is not None:
        record["logprobs"] = [
            {"token": e.token, "token_id": e.token_id, "logprob": e.logprob,
             "top_logprobs": [{"token": t.token, "token_id": t.token_id, "logprob": t.logprob}
                              for t in e.top_logprobs]}
            for e in result.logprobs]
    if result.error:
        record["error"] = result.error
    return record


# ---------------------------------------------------------------------------------------- inputs
def expand_images(specs: list[str]) -> list[str]:
    """URLs stay as they are; a glob pattern becomes its sorted matches (an error when there are none)."""
    sources = []
    for spec in specs:
        if spec.lower().startswith(("http://", "https://", "data:")) or not any(c in spec for c in "*?["):
            sources.append(spec)
            continue
        pattern = os.path.expanduser(spec)
        if os.path.exists(pattern):  # a real file whose name has glob characters
            sources.append(spec)
            continue
        matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
        if not matches:
            raise UsageError(f"no files match the image pattern '{spec}'")
        sources.extend(matches)
    return sources


def load_images(sources: list[str], allow_private_urls: bool = False) -> list:
    """Load each image once, before the model: errors come fast, and URLs are not fetched per prompt."""
    from jvlm.images.fetch import UrlPolicy, load_image

    policy = UrlPolicy(allow_private=allow_private_urls)
    return [load_image(s, policy=policy) for s in sources]


def user_message(images: list, text: str) -> dict:
    parts = [{"type": "image", "image": im} for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def system_messages(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


# ---------------------------------------------------------------------------------------- chat
def chat_main(args: argparse.Namespace) -> int:
    import jvlm
    from jvlm.engine.types import SamplingParams  # torch-free: bad flags fail at once

    sampling = dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    SamplingParams(**sampling)  # validate now, before the model loads
    choices = parse_choices(args.choices) if args.choices is not None else None
    if args.logprobs is not None and not args.json:
        raise UsageError("--logprobs adds log-probabilities to the --json output: add --json")
    if args.model is not None and not args.model.strip():
        raise UsageError("-m/--model is empty: give a snapshot directory or a hub id")
    interactive = not args.prompt and sys.stdin.isatty() and not args.json and not choices
    prompts = list(args.prompt)
    if not prompts and not interactive:
        prompts = [sys.stdin.read().strip()]
        if not prompts[0]:
            raise UsageError("no prompt: pass -p/--prompt, or pipe the prompt on stdin")
    labels = expand_images(args.image)
    images = load_images(labels, args.allow_private_urls)

    model = args.model or ("." if Path("config.json").is_file() else DEFAULT_MODEL)
    progress = StderrProgress()
    if not progress.enabled:  # quiet when piped, downloads from the hub included
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    t0 = time.perf_counter()
    try:
        vlm = jvlm.load(model, args.dtype, progress=progress.loading, threads=args.threads)
    finally:
        progress.stop()
    progress.note(f"Loaded {vlm.snapshot} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")
    try:
        if interactive:
            return interactive_chat(vlm, args, images, labels, SamplingParams(**sampling), progress)
        if progress.enabled:
            vlm.engine.on_vision_progress = progress.vision
        if choices:
            return run_choices(vlm, args, prompts, images, labels, choices)
        options = dict(sampling, max_crops=args.max_crops, max_pixels=args.max_pixels)
        if args.logprobs is not None:
            options.update(logprobs=True, top_logprobs=args.logprobs)
        return run_batch(vlm, args, prompts, images, labels, options)
    finally:
        progress.stop()
        vlm.close()


def run_batch(vlm, args, prompts: list[str], images: list, labels: list[str], options: dict) -> int:
    """Every prompt is its own conversation; all run as one batch through the engine."""
    conversations = [system_messages(args.system) + [user_message(images, p)] for p in prompts]
    out, n = Output(), len(prompts)
    if args.json or not args.stream:
        results = vlm.chat(conversations, **options)
        for i, result in enumerate(results):
            if args.json:  # plain even on a terminal: it is for programs
                print(json.dumps(json_record(i, prompts[i], labels, result), ensure_ascii=False), flush=True)
                continue
            if i:
                out()
            print_header(out, i, n, labels, prompts[i])
            print_response(out, result.text)
            out()
            print_stats(out, result, vlm.context_length)
    else:  # deltas arrive interleaved: show conversation i live, buffer the later ones until their turn
        results, pending, current = [None] * n, [[] for _ in range(n)], 0
        print_header(out, 0, n, labels, prompts[0], response=False)
        for k, delta in enumerate(vlm.chat(conversations, stream=True, **options)):
            if k == 0:  # images are encoded by now; a progress bar from here on would erase a half-printed line
                vlm.engine.on_vision_progress = None
                out(LAST, ("Response: ", "bold green"), end="")
            if delta.index == current:
                print_response(out, delta.text)
            else:
                pending[delta.index].append(delta.text)
            if delta.result is not None:
                results[delta.index] = delta.result
            while current < n and results[current] is not None:
                out()
                print_stats(out, results[current], vlm.context_length)
                current += 1
                if current < n:
                    out()
                    print_header(out, current, n, labels, prompts[current])
                    print_response(out, "".join(pending[current]))
    failed = [(i, r.error) for i, r in enumerate(results) if r.finish_reason == "error"]
    for i, error in failed:
        print(f"error: conversation {i + 1}: generation failed: {error}", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


def run_choices(vlm, args, prompts: list[str], images: list, labels: list[str], choices: list[str]) -> int:
    """Closed questions: each candidate's probability as the answer (one shared prefill per conversation)."""
    out, n = Output(), len(prompts)
    for i, prompt in enumerate(prompts):
        conversation = system_messages(args.system) + [user_message(images, prompt)]
        scored = vlm.score(conversation, choices, max_crops=args.max_crops, max_pixels=args.max_pixels)
        if args.json:
            print(json.dumps({"conversation": i + 1, "prompt": prompt, "images": labels,
                              "choices": [{"text": c.text, "probability": c.probability, "logprob": c.logprob,
                                           "num_tokens": c.num_tokens} for c in scored.candidates]},
                             ensure_ascii=False), flush=True)
            continue
        if i:
            out()
        print_header(out, i, n, labels, prompt, response=False)
        width = max(len(c.text) for c in scored.candidates)
        for c in sorted(scored.candidates, key=lambda c: -c.probability):
            out(f"  {c.text:<{width}}  {100 * c.probability:6.2f}%  (logprob {c.logprob:.4f}, {c.num_tokens} tokens)")
    return EXIT_OK


class DeferredInterrupt:
    """The first Ctrl-C only sets a flag that the answer loop checks between tokens, so the engine is never
    interrupted half-way through a step (its caches stay consistent); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> DeferredInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:  # a safe point (between vision chunks): give up the step
        if self.requested:
            raise KeyboardInterrupt


HELP = "Commands: /image PATH adds an image, /clear starts over, /exit leaves. Ctrl-C stops an answer."


def interactive_chat(vlm, args, images: list, labels: list[str], params, progress: StderrProgress) -> int:
    import readline  # noqa: F401  (line editing and input history for input())

    out = Output()
    history: list[dict] = []  # the messages so far (multi-turn over the same images)
    attach = list(images)  # images that go into the next user message
    if labels:
        print_images(out, labels, last=True)
    out((HELP, "dim"))
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            out()
            return EXIT_OK
        except KeyboardInterrupt:
            out()
            out(("(/exit or Ctrl-D leaves the chat)", "dim"))
            continue
        command, _, argument = line.partition(" ")
        if command in ("/exit", "/quit"):
            return EXIT_OK
        if command == "/clear":
            history, attach = [], list(images)
            out(("Conversation cleared; images kept: ", "dim"), str(len(images)))
        elif command == "/image":
            try:
                sources = expand_images([argument.strip().strip("'\"")] if argument.strip() else [])
                if not sources:
                    raise UsageError("usage: /image PATH (a path, http(s) URL or glob pattern)")
                new = load_images(sources, args.allow_private_urls)
            except (UsageError, JvlmError) as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            images, attach = images + new, attach + new
            for source in sources:
                out(("Added image ", "dim"), source)
        elif command.startswith("/"):
            out((f"unknown command {command}. " + HELP, "dim"))
        elif line:
            question = user_message(attach, line)
            result = answer(vlm, system_messages(args.system) + history + [question], params, args, out, progress)
            if result is not None and (result.text or result.finish_reason != "cancelled"):
                history, attach = history + [question, {"role": "assistant", "content": result.text}], []


def answer(vlm, messages: list[dict], params, args, out: Output, progress: StderrProgress):
    """Stream one answer; Ctrl-C cancels it and keeps the session. Returns the result, None on error."""
    try:
        handle = vlm.submit(vlm.prepare(messages, max_crops=args.max_crops, max_pixels=args.max_pixels), params)
    except JvlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    with DeferredInterrupt() as interrupt:
        def on_vision(done: int, total: int) -> None:
            progress.vision(done, total)
            interrupt.check()

        vlm.engine.on_vision_progress = on_vision
        try:
            for delta in handle:
                out(delta.text, end="")
                if interrupt.requested:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            progress.stop()
            vlm.engine.on_vision_progress = None
        if not handle.finished:
            handle.cancel()
        result = handle.result()  # after cancel(): the engine drops the request and reports what it had
    out()
    if result.finish_reason == "cancelled":
        out((f"[interrupted after {result.usage.completion_tokens} tokens]", "yellow"))
    elif result.finish_reason == "error":
        print(f"error: generation failed: {result.error}", file=sys.stderr)
        return None
    print_stats(out, result, vlm.context_length)
    return result


# ---------------------------------------------------------------------------------------- other commands
def write_tiny_main(args: argparse.Namespace) -> int:
    from jvlm.testing import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.directory, seed=args.seed))
    return EXIT_OK


# ---------------------------------------------------------------------------------------- the edge
def run(func, args: argparse.Namespace) -> int:
    """Run a subcommand; every failure becomes one ``error:`` line and an exit code (a traceback with --debug)."""
    debug = getattr(args, "debug", False)
    try:
        return func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `jvlm chat ... | head -1`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (UsageError, InvalidRequestError) as e:  # ImageError is an InvalidRequestError
        return fail(e, EXIT_USAGE, debug)
    except JvlmError as e:
        return fail(e, EXIT_ERROR, debug)
    except Exception as e:
        return fail(f"unexpected {type(e).__name__}: {e}" + ("" if debug else " (--debug shows the traceback)"),
                    EXIT_ERROR, debug)


def fail(error: Exception | str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    lines = str(error).strip().splitlines() or [type(error).__name__]  # e.g. a list of checkpoint problems
    more = f" (and {len(lines) - 1} more lines; --debug shows them)" if len(lines) > 1 and not debug else ""
    print(f"error: {lines[0]}{more}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """``jvlm COMMAND ...``"""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except JvlmError as e:
        return fail(e, EXIT_ERROR, "--debug" in argv)
    args = parser.parse_args(argv)
    return run(args.func, args)


def infer_main(argv: list[str] | None = None, prog: str = "infer.py") -> int:
    """``infer.py``: ``jvlm chat`` under another name (same flags, same output)."""
    parser = argparse.ArgumentParser(prog=prog, description="Ask jina-vlm about images (same as `jvlm chat`).",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_arguments(parser)
    return run(chat_main, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
