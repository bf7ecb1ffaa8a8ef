"""``aetheris distill``: the command line, and the stages run in pipeline order with one teacher.

    aetheris distill --config configs/nano-distill.yaml [--stages align,kl,sft] [key.sub=value ...] [--resume]
    aetheris distill --config configs/tiny-aya-distill.yaml --plan [--processes 8] [--gpu-memory 80GB]

``--stages`` (a comma list over align, kl, sft) runs ``align.run_align``, ``kd.run_kl`` and ``sft.run_sft`` in
that order. Everything that can be checked without weights is checked first: the config, the plan against
``--gpu-memory``, the starting student of the first stage, and every stage's out_dir (another run's
checkpoints). The teacher is then loaded once and handed from stage to stage (stage 2 with an existing
teacher cache and stage 3 with ``sft.beta`` = 0 need none). With ``run_dir`` set, the stages write to
``<run_dir>/{align,kl,sft}`` (each: checkpoints/, config.json, metrics.jsonl, ``<stage>_report.json``,
``student/``), and each stage starts from the previous stage's ``student/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from aetheris.distill.align import run_align
from aetheris.distill.common import load_teacher_model, previous_student
from aetheris.config_io import add_config_help
from aetheris.distill.config import STAGES, DistillConfig, load_distill_config, parse_stages
from aetheris.distill.kd import run_kl
from aetheris.distill.sft import run_sft
from aetheris.plan import check_fits, format_plan, parse_memory, plan_distill
from aetheris.runs import claim_run_folder


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML distillation config (see configs/nano-distill.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. align.train.max_steps=20")
    parser.add_argument("--stages", default="align,kl,sft",
                        help=f"comma list over {', '.join(STAGES)}, run in pipeline order (default: all three)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue each stage from the newest good checkpoint in its out_dir, or (one stage) from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the stages over in out_dirs that hold another run's checkpoints (deletes them)")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory each stage needs per process (no weights are loaded) and exit")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes the plan assumes (default: WORLD_SIZE, else 1)")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="memory per device, e.g. 80GB: a run (or --plan) whose plan exceeds it is refused")
    parser.add_argument("--plan-device", choices=("gpu", "cpu"), default="gpu",
                        help="device the plan assumes (teacher.dtype auto: bf16 on gpu, fp32 on cpu)")
    add_config_help(parser, DistillConfig)


def run(args) -> int:
    """Failures propagate to ``aetheris.cli`` (one line, documented exit code); all are checked before the teacher loads."""
    stages = parse_stages(args.stages)
    cfg = load_distill_config(args.config, args.overrides)
    if len(stages) > 1 and args.resume not in (None, "latest"):
        raise ValueError("--resume CHECKPOINT names one stage's checkpoint; run that stage alone "
                         "(or use --resume without a path)")
    if args.plan or args.gpu_memory:  # a plan that does not fit is a ValueError: one line, exit 2
        processes = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
        memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
        plan = plan_distill(cfg, processes=processes, device=args.plan_device)
        if args.plan and int(os.environ.get("RANK", "0")) == 0:
            print(format_plan(plan, stages))
        if memory is not None:
            check_fits(plan, memory, stages)
        if args.plan:
            return 0
    if stages[0] != "align":
        previous_student(cfg, stages[0])
    out_dirs = {stage: Path(t.out_dir) for stage, t in cfg.stage_train().items()}
    for stage in stages:  # a stage must not fail on another run's folder after the teacher has loaded
        claim_run_folder(out_dirs[stage], resume=args.resume, overwrite=args.overwrite, dry_run=True)
    teacher = None
    for stage in stages:
        if stage == "align":
            teacher = load_teacher_model(cfg)  # loaded once, shared by the stages that follow
            report = run_align(cfg, teacher=teacher, resume=args.resume, overwrite=args.overwrite)
            print(f"stage 1 report: {out_dirs['align'] / 'align_report.json'} "
                  f"(KL random {report['kl_random_init']['mean']:.4f} / transfer {report['kl_after_transfer']['mean']:.4f}"
                  f" / aligned {report['kl_after_align']['mean']:.4f}); student: {out_dirs['align'] / 'student'}")
        elif stage == "kl":
            if not cfg.kl.cache:  # with a cache, run_kl loads the teacher only if the cache must be written
                teacher = teacher or load_teacher_model(cfg)
            report = run_kl(cfg, teacher=teacher, resume=args.resume, overwrite=args.overwrite)
            print(f"stage 2 report: {out_dirs['kl'] / 'kl_report.json'} (held-out KL "
                  f"{report['kl_before']['mean']:.4f} -> {report['kl_after']['mean']:.4f}); "
                  f"student: {out_dirs['kl'] / 'student'}")
        else:
            if cfg.sft.beta > 0:
                teacher = teacher or load_teacher_model(cfg)
            report = run_sft(cfg, teacher=teacher, resume=args.resume, overwrite=args.overwrite)
            b, a = report["toolcall_before"]["overall"], report["toolcall_after"]["overall"]
            print(f"stage 3 report: {out_dirs['sft'] / 'sft_report.json'} (tool-call parse "
                  f"{b['parsed']:.3f} -> {a['parsed']:.3f}, name {b['name']:.3f} -> {a['name']:.3f}); "
                  f"student: {out_dirs['sft'] / 'student'}")
    return 0
