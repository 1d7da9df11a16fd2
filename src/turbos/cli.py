"""The `turbos` command: one entry point with sub-commands."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from turbos.config import LAYER_KINDS, ConfigError


def _cmd_params(args: argparse.Namespace) -> int:
    from turbos.params import count_parameters, format_count
    from turbos.presets import get_preset

    config = get_preset(args.preset)
    counts = count_parameters(config)
    if args.json:
        print(
            json.dumps(
                {"preset": args.preset, "layers": _layer_summary(config), "parameters": counts}, indent=2
            )
        )
        return 0
    print(f"preset {args.preset}: layout {config.layout!r} -> {_layer_summary(config)}")
    print(f"{'component':<16}{'total':>12}{'activated':>12}")
    for name, row in counts.items():
        if name == "total":
            print("-" * 40)
        print(f"{name:<16}{format_count(row['total']):>12}{format_count(row['activated']):>12}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from turbos.distributed.planner import GIB, Layout, PlanError, format_plans, plan, suggest
    from turbos.presets import get_preset

    config = get_preset(args.preset)
    options = dict(seq_len=args.seq_len, micro_batch=args.micro_batch, tokens_per_step=args.tokens_per_step)
    given = {k: getattr(args, k) for k in ("dp", "ep", "cp", "tp", "pp") if getattr(args, k) is not None}
    if given:
        rest = Layout(**{k: v for k, v in given.items() if k != "dp"}).gpus
        if "dp" not in given and args.gpus % rest:
            raise PlanError(f"--gpus {args.gpus} is not a multiple of ep*cp*tp*pp = {rest}")
        layout = Layout(**{"dp": args.gpus // rest, **given})
        if layout.gpus != args.gpus:
            raise PlanError(f"dp*ep*cp*tp*pp = {layout.gpus} does not match --gpus {args.gpus}")
        ac = args.activation_checkpointing
        checkpointing = (False, True) if ac is None else (ac,)
        candidates = [
            plan(config, layout, gpu_memory_gib=args.gpu_memory, activation_checkpointing=ac, **options)
            for ac in checkpointing
        ]
        fitting = [p for p in candidates if p.fits]
        plans = [min(fitting, key=lambda p: p.cost_seconds)] if fitting else candidates
    else:
        fitting, nearest = suggest(
            config,
            args.gpus,
            args.gpu_memory,
            top=args.top,
            activation_checkpointing=args.activation_checkpointing,
            **options,
        )
        plans = fitting or nearest
    if args.json:
        out = {"preset": args.preset, "gpus": args.gpus, "plans": [p.to_dict() for p in plans]}
        print(json.dumps(out, indent=2))
    else:
        print(
            f"preset {args.preset} on {args.gpus} x {args.gpu_memory:g} GiB: seq_len {args.seq_len}, "
            f"micro-batch {args.micro_batch}, {args.tokens_per_step} tokens per step "
            f"(memory of the busiest GPU, 10% margin; bf16 weights/grads, fp32 master + AdamW moments)"
        )
        print(format_plans(plans))
    if not any(p.fits for p in plans):
        need = min(p.total_memory for p in plans) / GIB
        print(f"no layout fits: the smallest needs {need:.1f} GiB per GPU", file=sys.stderr)
        return 1
    return 0


def _layer_summary(config) -> dict[str, int]:
    kinds = config.layer_types
    return {"layers": len(kinds), **{kind: kinds.count(kind) for kind in LAYER_KINDS}}


def _cmd_demo(args: argparse.Namespace) -> int:
    from turbos.post.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    flags = {
        "seed": args.seed,
        "adaptive_from": args.adaptive_from,
        "fusion_check_share": args.check_share,
        "stage2": True if args.with_stage2 else None,
    }
    settings = settings.replaced({k: v for k, v in flags.items() if v is not None})
    settings = settings.with_overrides(args.overrides)
    run_demo(args.out, settings, fresh=args.fresh, progress=not args.no_progress)  # prints the targets
    print(f"report: {args.out}/report.md")
    return 0


def _cmd_post_train(args: argparse.Namespace) -> int:
    """``turbos sft`` and ``turbos grpo``: a recipe, its overrides, resume flags; prints the summary."""
    if args.command == "sft":
        from turbos.post.sft import SFTRecipe as Recipe
        from turbos.post.sft import run_sft as run
    else:
        from turbos.rl import GRPORecipe as Recipe
        from turbos.rl import run_grpo as run

    from turbos.device import resolve_device
    from turbos.distributed.parallel import process_group

    recipe = Recipe.load(args.recipe, args.overrides)
    with process_group(resolve_device(recipe.device)) as main:  # under torchrun; one process: none
        summary = run(
            recipe,
            progress=not args.no_progress,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_at=args.stop_at,
        )
    if main:  # rank 0 reports
        print(json.dumps(summary, indent=2))
    return 0


def _teacher_kind(args: argparse.Namespace) -> str:
    """``--teacher``, or the kind that ``--teacher-url`` / ``--teacher-dir`` imply (builtin with
    neither); ValueError when they disagree."""
    implied = [kind for kind, value in (("endpoint", args.teacher_url), ("model", args.teacher_dir)) if value]
    if len(implied) == 2:
        raise ValueError(
            "give --teacher-url (an endpoint teacher) or --teacher-dir (a model teacher), not both"
        )
    if args.teacher is None:
        return implied[0] if implied else "builtin"
    if implied and implied[0] != args.teacher:
        flag = "--teacher-url" if implied[0] == "endpoint" else "--teacher-dir"
        raise ValueError(f"{flag} is for --teacher {implied[0]}, not --teacher {args.teacher}")
    return args.teacher


def _cmd_fuse_cot(args: argparse.Namespace) -> int:
    from turbos.data.tasks import generate_problems
    from turbos.post.cot_fusion import (
        BuiltinTeacher,
        EndpointTeacher,
        ModelTeacher,
        check_output,
        check_share_value,
        fuse_dataset,
        write_jsonl,
    )
    from turbos.post.evaluate import read_problems, repeated_answers
    from turbos.serve import LLMEngine

    # Everything that can be checked is checked before minutes (or hours) of generation.
    check_share_value(args.check_share)
    check_output(args.output)
    kind = _teacher_kind(args)
    if args.problems:
        problems = read_problems(args.problems)
    else:
        problems = generate_problems(args.n, families=args.families, levels=args.levels, seed=args.seed)
    if kind == "builtin":
        if any(not p.steps for p in problems):
            raise ValueError(
                "the builtin teacher needs built-in problems; for your own, give --teacher-url (an "
                "OpenAI-compatible endpoint) or --teacher-dir (a turbos model directory)"
            )
        teacher = BuiltinTeacher()
    elif kind == "model":
        if not args.teacher_dir:
            raise ValueError("--teacher model needs --teacher-dir (a turbos model directory)")
        teacher_engine = LLMEngine.from_pretrained(args.teacher_dir, device=args.device)
        teacher = ModelTeacher(teacher_engine, max_tokens=args.teacher_max_tokens)
    else:
        if not args.teacher_url:
            raise ValueError("--teacher endpoint needs --teacher-url (an OpenAI-compatible base URL)")
        teacher = EndpointTeacher(
            args.teacher_url, args.teacher_model, args.teacher_api_key, max_tokens=args.teacher_max_tokens
        )
        teacher.probe(problems[0])
    engine = _load_engine(args)
    responses = repeated_answers(engine, problems, args.samples, args.temperature, args.seed, args.max_tokens)
    examples, stats = fuse_dataset(
        problems, responses, teacher, args.max_rounds, check_share=args.check_share, seed=args.seed
    )
    write_jsonl(examples, args.output)
    print(json.dumps(stats.to_dict(), indent=2))
    print(f"wrote {len(examples)} examples to {args.output}")
    if isinstance(teacher, EndpointTeacher) and teacher.empty_replies:
        print(
            f"turbos fuse-cot: warning: {teacher.empty_replies} teacher replies had no text (failed rounds)",
            file=sys.stderr,
        )
    if not examples:
        print(f"turbos fuse-cot: warning: no examples kept ({stats.dropped} dropped)", file=sys.stderr)
        return 1
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from turbos.post.evaluate import builtin_problems, evaluate_modes, format_table, read_problems
    from turbos.post.routing import routing_report

    if args.problems:
        problems = read_problems(args.problems)
    else:
        n = args.per_level * len(args.families or [0] * 4) * len(args.levels or [0] * 5)
        problems = builtin_problems(n, args.families, args.levels, args.seed)
    engine = _load_engine(args)
    results, answers = evaluate_modes(engine, problems, args.modes, args.max_tokens)
    by = "family_level" if args.by_family else "level"
    print(json.dumps(results, indent=2) if args.json else format_table(results, by=by))
    if not args.json and {"no_think", "think"} <= set(args.modes):
        print("\n" + "\n".join(routing_report(a.row() for a in answers)).rstrip())
    return 0


def _cmd_deliberate(args: argparse.Namespace) -> int:
    from turbos.rl.deliberate import deliberate

    summary = deliberate(
        args.model,
        args.rival,
        args.out,
        rounds=args.rounds,
        prompts_per_category=args.per_category,
        sft_steps=args.sft_steps,
        sft_lr=args.sft_lr,
        seed=args.seed,
        families=args.families,
        levels=args.levels,
        mode=args.mode,
        max_tokens=args.max_tokens,
        device=args.device,
        progress=not args.no_progress,
    )
    rows = [*(r["profile"] for r in summary["rounds"]), summary["final"]["profile"]]
    for index, profile in enumerate(rows):
        label = "final" if index == len(rows) - 1 else f"round {index}"
        o = profile["overall"]
        print(
            f"{label}: accuracy {o['accuracy'] * 100:.0f}%, win rate {o['win_rate'] * 100:.0f}%, "
            f"loss rate {o['loss_rate'] * 100:.0f}%, weakest {profile['weakest']}"
        )
    print(f"weakest of round 0 ({summary['weakest_round0']}) improved: {summary['weakest_improved']}")
    print(f"summary: {args.out}/summary.json")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import itertools

    from turbos.data.corpora import build_corpus, interleave
    from turbos.data.tokenizer import save_tokenizer, train_tokenizer
    from turbos.serve.chat_template import save_chat_template

    corpus = interleave([build_corpus(spec) for spec in args.data])
    documents = itertools.islice(corpus, args.max_documents) if args.max_documents else corpus
    tokenizer = train_tokenizer(documents, args.vocab_size, show_progress=not args.no_progress)
    out = save_tokenizer(tokenizer, args.out)
    save_chat_template(out)
    print(
        f"wrote a {tokenizer.get_vocab_size()}-token byte-level BPE to {out} (tokenizer.json, chat template)"
    )
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from turbos.device import resolve_device
    from turbos.distributed.parallel import process_group
    from turbos.train.recipe import load_recipe
    from turbos.train.trainer import Trainer

    recipe = load_recipe(args.recipe, args.overrides)
    with process_group(resolve_device(recipe.device)) as main:  # under torchrun; one process: none
        trainer = Trainer(recipe, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        summary = trainer.train(stop_at=args.stop_at)
    if not main:  # rank 0 reports
        return 0
    val = summary["val_loss"]
    print(
        f"trained {summary['steps']}/{summary['total_steps']} steps, {summary['tokens']:,} tokens in "
        f"{summary['wall_s']:.1f} s; last val loss {'n/a' if val is None else f'{val:.4f}'}"
    )
    print(f"run directory {summary['run_dir']} (metrics.jsonl, checkpoints/)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from turbos.train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    from turbos.data.corpora import build_corpus
    from turbos.data.tokenizer import load_tokenizer
    from turbos.device import resolve_device
    from turbos.model import TurboSForCausalLM
    from turbos.train.data import validation_batches
    from turbos.train.evaluate import evaluate_loss, perplexity

    device = resolve_device(args.device)
    model = TurboSForCausalLM.from_pretrained(args.model, device=device)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    seq_len = args.seq_len or model.config.max_position_embeddings
    split, val_fraction = ("val", args.val_fraction) if args.split == "val" else ("train", 0.0)
    batches = validation_batches(
        build_corpus(args.data), tokenizer, seq_len, args.batch_size, args.batches, val_fraction, split
    )
    loss = evaluate_loss(model, batches, device, args.precision)
    tokens = sum(rows[:, 1:].numel() for rows in batches)
    if args.json:
        print(
            json.dumps({"loss": loss, "perplexity": perplexity(loss), "tokens": tokens, "seq_len": seq_len})
        )
    else:
        print(
            f"{args.split} loss {loss:.4f}, perplexity {perplexity(loss):.2f} over {tokens:,} tokens "
            f"(seq_len {seq_len})"
        )
    return 0


def _cmd_reward_serve(args: argparse.Namespace) -> int:
    import os

    from turbos.rl.remote import serve_reward
    from turbos.rl.rewards import load_reward

    try:
        reward_fn = load_reward(args.reward)
    except ValueError as err:
        print(f"turbos reward serve: {err}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("TURBOS_REWARD_API_KEY")
    print(
        f"serving reward {args.reward} at http://{args.host}:{args.port}/v1/reward "
        f"(API key {'on' if api_key else 'off'})",
        file=sys.stderr,
    )
    serve_reward(reward_fn, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from turbos.interop.convert import convert_from_hf, convert_to_hf

    if args.from_hf:
        model = convert_from_hf(args.from_hf, args.out, args.max_shard_size)
        print(
            f"{args.from_hf} -> {args.out}: layout {model.config.layout!r}, "
            f"{model.num_parameters() / 1e6:.1f}M parameters"
        )
        return 0
    if args.model_type is None:
        raise ConfigError("--to-hf needs --model-type (nemotron_h or hunyuan_v1_moe)")
    convert_to_hf(args.to_hf, args.out, args.model_type, args.max_shard_size)
    print(f"{args.to_hf} -> {args.out} ({args.model_type})")
    return 0


def _cmd_sandbox_run(args: argparse.Namespace) -> int:
    from turbos.rl.sandbox import Limits, Sandbox, SandboxUnavailable

    path = Path(args.file)
    language = args.language or ("bash" if path.suffix in (".sh", ".bash") else "python")
    tests = Path(args.tests).read_text() if args.tests else None
    try:
        with Sandbox(Limits(timeout=args.timeout, memory_mb=args.memory_mb), max_workers=1) as box:
            result = box.run(path.read_text(), language=language, tests=tests)
    except SandboxUnavailable as err:
        print(f"turbos sandbox run: {err}", file=sys.stderr)
        return 2
    print(f"exit code: {result.exit_code}" + (f" (killed: {result.killed})" if result.killed else ""))
    print(f"wall: {result.wall_seconds:.2f} s")
    for name, text, cut in (
        ("stdout", result.stdout, result.stdout_truncated),
        ("stderr", result.stderr, result.stderr_truncated),
    ):
        if text or cut:
            print(f"--- {name}{' (truncated)' if cut else ''} ---")
            print(text, end="" if text.endswith("\n") else "\n")
    if result.passed is not None:
        print(f"tests: {'passed' if result.passed else 'failed'}")
    return 0 if result.ok else 1


def _add_resume_flags(p: argparse.ArgumentParser, step: str) -> None:
    p.add_argument("--resume", help="a checkpoint directory, or 'auto' for the run's latest")
    p.add_argument("--overwrite", action="store_true", help="delete the run's existing checkpoints first")
    p.add_argument("--stop-at", type=int, help=f"stop after this {step} (continue later with --resume auto)")


def _int_at_least(minimum: int, at_most: int | None = None):
    """An argparse type: an integer of at least ``minimum`` (and at most ``at_most``)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def _add_model_flags(p: argparse.ArgumentParser, max_running: int) -> None:
    """How a command loads its model into an engine (serve, generate, chat, eval, fuse-cot)."""
    p.add_argument(
        "--model", required=True, help="directory with config.json, model.safetensors, tokenizer.json"
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--max-running",
        type=_int_at_least(1),
        default=max_running,
        help="sequences decoded together at most (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on CUDA or with --quantization, else fp32",
    )
    p.add_argument("--quantization", choices=["int8"], help="int8: weight-only int8 (activations in --dtype)")
    p.add_argument(
        "--enforce-eager", action="store_true", help="on CUDA, run decode steps eagerly, not as CUDA graphs"
    )


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The model flags and the engine's settings (serve, generate, chat), defaults from EngineConfig."""
    from turbos.serve.config import EngineConfig

    _add_model_flags(p, max_running=EngineConfig.max_running)
    p.add_argument(
        "--prefill-chunk",
        type=_int_at_least(1),
        default=EngineConfig.prefill_chunk,
        help="prompt tokens fed per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=_int_at_least(1),
        default=EngineConfig.max_prefill_tokens,
        help="padded prompt tokens (prompts x longest) prefilled together at most (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=_int_at_least(-(2**63), at_most=2**64 - 1),
        help="seed of the sampler for requests without their own (a 64-bit integer)",
    )


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    """The HTTP server's settings (serve), defaults from ServerConfig and EngineConfig."""
    from turbos.serve.config import EngineConfig, ServerConfig

    p.add_argument("--host", default=ServerConfig.host, help="address to bind (default: loopback only)")
    p.add_argument(
        "--port",
        type=_int_at_least(1, at_most=65535),
        default=ServerConfig.port,
        help="port to listen on (default: %(default)s)",
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set TURBOS_API_KEY)")
    p.add_argument(
        "--max-queue",
        type=_int_at_least(1),
        default=EngineConfig.max_waiting,
        help="waiting requests at most; more get 503 (default: %(default)s)",
    )
    p.add_argument("--served-model-name", help="model id in the API (default: the directory name)")
    p.add_argument(
        "--max-body-bytes",
        type=_int_at_least(1),
        default=ServerConfig.max_body_bytes,
        help="larger request bodies get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=ServerConfig.drain_timeout,
        help="seconds requests in flight get to finish on shutdown before being cancelled "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=ServerConfig.header_timeout,
        help="seconds a connection gets to send a request's headers; a slower one gets 408 and is closed "
        "(default: %(default)s)",
    )


def _load_engine(args: argparse.Namespace, **options):
    """The engine of ``_add_model_flags``; ``options`` are more ``EngineConfig`` fields."""
    import torch

    from turbos.serve import EngineConfig, LLMEngine

    engine_config = EngineConfig(
        max_running=args.max_running, cuda_graphs=False if args.enforce_eager else None, **options
    )
    return LLMEngine.from_pretrained(
        args.model,
        args.tokenizer,
        device=args.device,
        dtype={"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
        quantization=args.quantization,
        engine_config=engine_config,
    )


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-p", type=float, help="keep the most likely tokens up to this mass (default: all)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: all)")
    p.add_argument("--repetition-penalty", type=float, help="1 is none (default: none)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--thinking", choices=["auto", "think", "no_think"], help="thinking mode for chats")


def _engine_and_params(args: argparse.Namespace, **options):
    """The engine of ``_add_engine_flags`` (``options``: more ``EngineConfig`` fields) and the
    ``SamplingParams`` of ``_add_sampling_flags`` (None for a command without them); a sampling
    flag not given keeps the ``SamplingParams`` default."""
    from turbos.serve import SamplingParams

    engine = _load_engine(
        args,
        prefill_chunk=args.prefill_chunk,
        max_prefill_tokens=args.max_prefill_tokens,
        seed=args.seed,
        **options,
    )
    if not hasattr(args, "temperature"):
        return engine, None
    given = {
        name: getattr(args, name)
        for name in ("top_p", "top_k", "repetition_penalty")
        if getattr(args, name) is not None
    }
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, stop=args.stop, **given)
    return engine, params


def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from turbos.serve.async_engine import AsyncLLMEngine
    from turbos.serve.config import ServerConfig
    from turbos.serve.server import run_server

    config = ServerConfig(  # checked before the model loads
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("TURBOS_API_KEY"),
        max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout,
        header_timeout=args.header_timeout,
    )
    engine, _ = _engine_and_params(args, max_waiting=args.max_queue)
    name = args.served_model_name or Path(args.model).resolve().name
    key = "on" if config.api_key else "off"
    print(f"serving {name!r} on http://{config.host}:{config.port}/v1 (API key {key})")
    run_server(AsyncLLMEngine(engine), name, config)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from turbos.serve.offline import generate_records, read_requests

    requests = [{"prompt": args.prompt}] if args.prompt is not None else read_requests(args.input)
    engine, params = _engine_and_params(args)
    records = generate_records(engine, requests, params, chat=args.chat, thinking=args.thinking)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.output:
        with open(args.output, "w") as f:
            f.write(lines)
        print(f"wrote {len(records)} results to {args.output}", file=sys.stderr)
    elif args.prompt is not None and not args.json:
        record = records[0]
        if record.get("reasoning_content") is not None:
            print(f"[thinking]\n{record['reasoning_content']}\n[answer]")
        print(record.get("content", record["text"]))
    else:
        sys.stdout.write(lines)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from turbos.serve.interactive import run_chat

    engine, params = _engine_and_params(args)
    run_chat(engine, params, system=args.system, mode=args.thinking)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbos", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="total and activated parameters per component of a preset")
    p.add_argument("--preset", default="turbos-560b")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("plan", help="per-GPU memory and communication of parallel layouts (DP/EP/CP/TP/PP)")
    p.add_argument("--preset", default="turbos-560b")
    p.add_argument("--gpus", type=_int_at_least(1), required=True)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--seq-len", type=_int_at_least(1), default=4096)
    p.add_argument("--micro-batch", type=_int_at_least(1), default=1, help="sequences per micro-batch")
    p.add_argument(
        "--tokens-per-step", type=_int_at_least(1), default=2048 * 4096, help="global batch (560B recipe's)"
    )
    for degree in ("dp", "ep", "cp", "tp", "pp"):
        p.add_argument(f"--{degree}", type=_int_at_least(1), help=f"fix the {degree.upper()} degree")
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="per-layer checkpointing on or off (default: try both)",
    )
    p.add_argument("--top", type=_int_at_least(1), default=5, help="layouts to show")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("demo", help="the TurboS pipeline in miniature on built-in data")
    p.add_argument("--out", default="runs/demo", help="output folder (stages are reused on a re-run)")
    p.add_argument("--quick", action="store_true", help="minutes-long smoke run of every stage")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--seed", type=int, help="seed of every stage (default 0)")
    p.add_argument(
        "--adaptive-from",
        choices=["base", "short"],
        help="start the adaptive SFT from the pre-trained model (the report) or the short-CoT model",
    )
    p.add_argument(
        "--check-share",
        type=float,
        help="share of solved fusion problems checked in a think block (default 0, 0.25 with "
        "--quick; see docs/adaptive-cot.md)",
    )
    p.add_argument(
        "--with-stage2",
        action="store_true",
        help="add stage 7: GRPO Stage II (instruction following, recipes/grpo-general.yaml)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="any turbos.post.demo.DemoSettings field, e.g. adaptive_loss=token adaptive_steps=800",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (loss on assistant replies only)")
    p.add_argument("--recipe", required=True, help="YAML SFT recipe (see turbos.post.sft.SFTRecipe)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    _add_resume_flags(p, "step")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_post_train)

    p = sub.add_parser("grpo", help="GRPO with the adaptive-CoT rewards (report sections 3.2.2, 3.5)")
    p.add_argument("--recipe", required=True, help="YAML GRPO recipe (see turbos.rl.GRPORecipe)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. kl_coef=0.01 prompts.levels=[3,4]")
    _add_resume_flags(p, "step")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_post_train)

    p = sub.add_parser("fuse-cot", help="adaptive long-short CoT fusion data from a short-CoT model")
    _add_model_flags(p, max_running=64)
    p.add_argument("--output", required=True, help="fused chat JSONL to write")
    p.add_argument("--problems", help="JSONL of {question, answer}; default: built-in problems")
    p.add_argument("--n", type=_int_at_least(1), default=2000, help="built-in problems to draw")
    p.add_argument("--families", nargs="+")
    p.add_argument("--levels", nargs="+", type=int)
    p.add_argument(
        "--teacher",
        choices=["builtin", "model", "endpoint"],
        help="builtin: our step-by-step solver; model: a turbos model directory (--teacher-dir), "
        "in-process, in think mode; endpoint: an OpenAI-compatible server (--teacher-url). Default: "
        "what --teacher-url or --teacher-dir implies, else builtin",
    )
    p.add_argument("--teacher-dir", help="turbos model directory of --teacher model")
    p.add_argument("--teacher-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--teacher-model", default="teacher", help="model name sent to the endpoint")
    p.add_argument("--teacher-api-key", default="EMPTY")
    p.add_argument(
        "--teacher-max-tokens", type=_int_at_least(1), default=512, help="tokens of each teacher continuation"
    )
    p.add_argument("--max-rounds", type=_int_at_least(1), default=3)
    p.add_argument(
        "--samples",
        type=_int_at_least(0),
        default=0,
        help="sampled answers besides the greedy one; solved = all right",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="temperature of those samples")
    p.add_argument(
        "--check-share",
        type=float,
        default=0.0,
        help="share of solved problems whose right answer is checked in a think block (0: as the report)",
    )
    p.add_argument(
        "--max-tokens", type=_int_at_least(1), default=64, help="tokens of the short model's attempt"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_fuse_cot)

    p = sub.add_parser("eval", help="accuracy, tokens and thinking rate by level in each thinking mode")
    _add_model_flags(p, max_running=64)
    p.add_argument("--problems", help="JSONL of {question, answer[, level]}; default: built-in test split")
    p.add_argument("--families", nargs="+")
    p.add_argument("--levels", nargs="+", type=int)
    p.add_argument("--per-level", type=int, default=20, help="built-in problems per family and level")
    p.add_argument("--modes", nargs="+", default=["no_think", "think", "auto"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by-family", action="store_true", help="one row per family and level")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "deliberate", help="multi-round deliberation: judge vs rivals, weakness profile, SFT on loss data"
    )
    p.add_argument("--model", required=True, help="the turbos model directory to improve")
    p.add_argument(
        "--rival",
        action="append",
        required=True,
        help="a rival: a model directory or an endpoint http://HOST:PORT/v1#MODEL (repeatable)",
    )
    p.add_argument("--rounds", type=_int_at_least(1), default=1)
    p.add_argument("--out", default="runs/deliberate")
    p.add_argument("--per-category", type=_int_at_least(1), default=4, help="prompts per family and level")
    p.add_argument("--sft-steps", type=_int_at_least(1), default=20)
    p.add_argument(
        "--sft-lr",
        type=float,
        default=1e-4,
        help="SFT learning rate on the loss data (the demo's 2e-3 wrecks an RL-tuned model)",
    )
    p.add_argument("--families", nargs="+")
    p.add_argument("--levels", nargs="+", type=int)
    p.add_argument("--mode", default="auto", choices=["auto", "think", "no_think"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_deliberate)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE with the chat and thinking special tokens")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="corpus specs, e.g. builtin:pydocs 'text:*.md'; several are read through, taking turns",
    )
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    p.add_argument("--max-documents", type=_int_at_least(0), default=0, help="0: the whole corpus")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("pretrain", help="pre-train a model from a YAML recipe")
    p.add_argument("--recipe", required=True, help="e.g. recipes/tiny.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, e.g. optimizer.lr=1e-3"
    )
    _add_resume_flags(p, "global step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("plot", help="PNG plots of a training run (loss, LR per group, expert load)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("eval-ppl", help="validation loss and perplexity of a saved model on a corpus")
    p.add_argument("--model", required=True, help="directory with config.json, model.safetensors")
    p.add_argument("--data", required=True, help="source spec, e.g. builtin:reasoning or jsonl:path#text")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: max_position_embeddings)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--batches", type=_int_at_least(1), default=16, help="at most this many batches")
    p.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="'val': the held-out documents (same hash split as training); 'all': every document",
    )
    p.add_argument("--val-fraction", type=float, default=0.01, help="the training run's data.val_fraction")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_eval_ppl)

    p = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint (nemotron_h, hunyuan_v1_moe) to or from turbos"
    )
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="a Hugging Face model directory to read")
    direction.add_argument(
        "--to-hf", metavar="DIR", help="a turbos model directory to write out as --model-type"
    )
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--model-type", choices=["nemotron_h", "hunyuan_v1_moe"], help="with --to-hf: the target")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file (e.g. 5GB, 500MB)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("sandbox", help="run untrusted code in the isolated code sandbox (report section 3.4)")
    box = p.add_subparsers(dest="sandbox_command", required=True)
    p = box.add_parser("run", help="run a program (and its tests) in the sandbox; non-zero exit if it fails")
    p.add_argument("file", help="the program's source")
    p.add_argument("--tests", help="test code run after the program (Python asserts or shell commands)")
    p.add_argument("--language", choices=["python", "bash"], help="default: bash for .sh files, else python")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds")
    p.add_argument("--memory-mb", type=_int_at_least(16), default=512, help="address space per process")
    p.set_defaults(func=_cmd_sandbox_run)

    p = sub.add_parser("reward", help="reward functions as HTTP services (POST /v1/reward)")
    rew = p.add_subparsers(dest="reward_command", required=True)
    p = rew.add_parser("serve", help="serve a reward function at POST /v1/reward (an http:// reward spec)")
    p.add_argument("--reward", required=True, help="builtin:NAME or package.module:function")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $TURBOS_REWARD_API_KEY)")
    p.add_argument("--max-batch", type=_int_at_least(1), default=1024, help="most samples per request")
    p.set_defaults(func=_cmd_reward_serve)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, thinking modes)")
    _add_engine_flags(p)
    _add_server_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("generate", help="batched generation for a prompt or a JSONL file of prompts/chats")
    _add_engine_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (a user message with --chat)")
    source.add_argument(
        "--input", help='JSONL: {"prompt": ...} or {"messages": [...]} per line, optional "id"'
    )
    p.add_argument("--output", help="JSONL results (default: stdout)")
    p.add_argument("--chat", action="store_true", help="treat prompts as user messages in the chat format")
    p.add_argument("--json", action="store_true", help="JSONL on stdout even for a single --prompt")
    _add_sampling_flags(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with streaming and thinking modes")
    _add_engine_flags(p)
    p.add_argument("--system", help="system message")
    _add_sampling_flags(p)
    p.set_defaults(func=_cmd_chat)
    return parser


# Long commands: Ctrl-C or SIGTERM ends them with one line on stderr saying what was saved and the
# command that goes on, exit code 128 + the signal (130, 143).
INTERRUPTIBLE = frozenset({"demo", "pretrain", "sft", "grpo", "fuse-cot", "eval"})


def _raise_interrupted(signum: int, _frame) -> None:
    """SIGTERM handler: stop the way Ctrl-C does (a KeyboardInterrupt that carries the signal)."""
    from turbos.train.loop import Interrupted

    raise Interrupted(signum)


def _turbos(words: list[str]) -> str:
    return shlex.join(["turbos", *words])


def _with_resume(words: list[str]) -> list[str]:
    """The command line with ``--resume auto`` instead of any --resume or --overwrite."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--resume":
            skip = True
        elif word != "--overwrite" and not word.startswith("--resume="):
            out.append(word)
    return [*out, "--resume", "auto"]


def _interrupted_line(
    args: argparse.Namespace, words: list[str], err: KeyboardInterrupt, started: float
) -> str:
    """The one line an interrupted command ends with: where it stopped, what was saved, and the
    command that continues (or repeats) the work."""
    from turbos.train.loop import Interrupted

    what = err.message if isinstance(err, Interrupted) else "interrupted"
    if args.command == "demo":  # finished stages are reused, an interrupted one resumes
        return f"{what}; resume with: {_turbos([w for w in words if w != '--fresh'])}"
    if args.command in ("pretrain", "sft", "grpo"):
        if isinstance(err, Interrupted) and err.checkpoint is not None:
            return f"{what}; resume with: {_turbos(_with_resume(words))}"
        if not isinstance(err, Interrupted):
            what = "interrupted before training began: nothing saved"
        return f"{what}; start again with: {_turbos(words)}"
    if args.command == "fuse-cot":
        output = Path(args.output)
        if output.is_file() and output.stat().st_mtime >= started:
            return f"{what}: {output} was written in full; nothing to re-run"
        return (
            f"{what}: nothing written to {output} (it is written whole when fusion finishes); "
            f"run again with: {_turbos(words)}"
        )
    return f"{what}: nothing saved (results print when every mode is done); run again with: {_turbos(words)}"


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(words)
    on_sigterm = args.command in INTERRUPTIBLE and threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_sigterm else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    started = time.time()
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if args.command not in INTERRUPTIBLE:
            raise
        from turbos.train.loop import signal_number

        print(_interrupted_line(args, words, err, started), file=sys.stderr)
        return 128 + signal_number(err)
    except (ConfigError, OSError, ValueError) as err:
        print(f"turbos {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
