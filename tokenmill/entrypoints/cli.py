"""tokenmill generate | chat | serve | bench throughput | bench serve.

Engine flags are generated from the EngineConfig dataclass fields (one help string per field). Every flag's help
ends with its default (tests/unit/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from tokenmill.config import ENGINE_CONFIG_PARTS
from tokenmill.logger import init_logger


def _bool_arg(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(field: dataclasses.Field) -> Any:
    text = str(field.type)
    if "bool" in text:
        return _bool_arg
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _shown_default(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def engine_flag_help(field: dataclasses.Field) -> str:
    """The field's help string, ending with its default unless the text already says what the default means.
    '%' is escaped: argparse formats help strings."""
    text = field.metadata.get("help", "")
    if not text:
        raise ValueError(f"engine config field {field.name} has no help string")
    if "default:" not in text:
        text = f"{text} (default: {_shown_default(field.default)})"
    return text.replace("%", "%%")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for part in ENGINE_CONFIG_PARTS.values():
        for field in dataclasses.fields(part):
            flag = "--" + field.name.replace("_", "-")
            kind = _field_type(field)
            # A bare boolean flag (--compile) means true; --flag false still turns one off. The parser's default
            # stays None so that only the flags given reach EngineConfig (whose defaults the help shows).
            extra: dict[str, Any] = {"nargs": "?", "const": True} if kind is _bool_arg else {}
            group.add_argument(flag, dest=field.name, type=kind, default=None, help=engine_flag_help(field), **extra)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for part in ENGINE_CONFIG_PARTS.values() for f in dataclasses.fields(part)}
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens,
                       help="most tokens generated per prompt (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=1.0,
                       help="nucleus sampling: the fewest tokens whose probability reaches top_p "
                            "(default: %(default)s)")
    group.add_argument("--top-k", type=int, default=0,
                       help="sample among the k most likely tokens; 0 = all (default: %(default)s)")
    group.add_argument("--min-p", type=float, default=0.0,
                       help="drop tokens less likely than min_p times the most likely one (default: %(default)s)")
    group.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="> 1 discourages tokens already in the prompt or output (default: %(default)s)")


def sampling_params_from(args: argparse.Namespace) -> Any:
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import RequestOutputKind

    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    params = sampling_params_from(args).clone(output_kind=RequestOutputKind.DELTA)
    first_token_at = None
    for i, prompt in enumerate(args.prompt):
        engine.add_request(str(i), prompt, params)
        if len(args.prompt) > 1:
            print(f"--- prompt {i}: {prompt}")
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first_token_at is None and out.outputs[0].token_ids:
                    first_token_at = process_uptime()
                print(out.outputs[0].text, end="", flush=True)
        print()
    if args.timing and first_token_at is not None:
        print(f"[process start to first token: {first_token_at:.2f} s]", file=sys.stderr)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """Starts the engine (building or reading the execution plan) and prints the plan: every operation,
    bucket, chosen kernel and each candidate's measured time."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    plan = engine.core.plan
    if plan is None:
        print("no execution plan: it is built for CPU engines without --compile", file=sys.stderr)
        return 1
    print(plan.table())
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import RequestOutputKind

    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    params = sampling_params_from(args).clone(output_kind=RequestOutputKind.DELTA)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    turn = 0
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        engine.add_request(f"chat-{turn}", engine.apply_chat_template(messages), params, add_special_tokens=False)
        reply = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                reply.append(out.outputs[0].text)
                print(out.outputs[0].text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1
    return 0


def process_uptime() -> float | None:
    """Seconds since this process started (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill LLM inference engine")
    parser.add_argument("--log-level", default="INFO",
                        help="logging level: DEBUG, INFO, WARNING (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one or more prompts (streams tokens)")
    gen.add_argument("prompt", nargs="+", help="prompt text")
    gen.add_argument("--timing", action="store_true",
                     help="print time from process start to first token (default: off)")
    add_sampling_args(gen, max_tokens=128)
    add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template (streams tokens)")
    chat.add_argument("--system", default=None, help="system message (default: none)")
    add_sampling_args(chat, max_tokens=512)
    add_engine_args(chat)
    chat.set_defaults(func=_cmd_chat)

    plan = sub.add_parser("plan", help="print the execution plan: the kernel chosen for each operation on this "
                                       "machine and the time of every candidate (built once, then cached)")
    add_engine_args(plan)
    plan.set_defaults(func=_cmd_plan)

    from tokenmill.entrypoints.bench_cli import add_bench_parser
    from tokenmill.entrypoints.openai.launcher import add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    init_logger(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
