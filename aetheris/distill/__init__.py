"""Distillation of a teacher transformer into an Aetheris student: ``aetheris distill``, three stages.

    config.py    the distill config: one section per stage, each with its own ``train`` loop section
    common.py    device, teacher and starting student, held-out rows and the held-out KL, stage output
    align.py     stage 1: weight transfer + teacher-forced, layer-local alignment (``run_align``)
    kd.py        stage 2: logit distillation, group-DRO, the teacher-cache path (``run_kl``)
    sft.py       stage 3: chat SFT with optional KL to the teacher and stage-2 replay (``run_sft``)
    pipeline.py  the command line: stage order, one teacher shared by the stages, ``--plan``

Data flows CLI -> ``pipeline.run`` (config loaded and checked, teacher loaded once) -> ``run_<stage>(cfg,
teacher=...)`` (student, data and the stage's loss_fn) -> ``train.train(RunConfig(..., train=cfg.<stage>.train),
loss_fn=...)`` (the shared loop) -> ``<out_dir>/<stage>_report.json`` and ``<out_dir>/student`` for the next stage.
"""

from aetheris.distill.align import (PairAligner, build_student, make_align_loss, mixer_parameters, normalised_mse,
                                    pair_forward, pair_parameters, pair_report, run_align)
from aetheris.distill.common import (check_same_vocabulary, heldout_kl, load_teacher_model, previous_student,
                                     report_rows)
from aetheris.distill.config import (EXACT_TRANSFER, STAGES, AlignConfig, DistillConfig, KLConfig, SFTConfig,
                                     StudentConfig, TeacherConfig, TransferConfig, load_distill_config, parse_stages)
from aetheris.distill.kd import (FamilyDRO, cache_ready, family_balanced_probs, family_summary, make_kd_loss,
                                 run_kl)
from aetheris.distill.pipeline import add_arguments, run
from aetheris.distill.sft import ReplayMix, make_sft_loss, run_sft

__all__ = [
    "EXACT_TRANSFER", "STAGES", "AlignConfig", "DistillConfig", "FamilyDRO", "KLConfig", "PairAligner", "ReplayMix",
    "SFTConfig", "StudentConfig", "TeacherConfig", "TransferConfig", "add_arguments", "build_student", "cache_ready",
    "check_same_vocabulary",
    "family_balanced_probs", "family_summary", "heldout_kl", "load_distill_config", "load_teacher_model",
    "make_align_loss", "make_kd_loss", "make_sft_loss", "mixer_parameters", "normalised_mse", "pair_forward",
    "pair_parameters", "pair_report", "parse_stages", "previous_student", "report_rows", "run", "run_align", "run_kl",
    "run_sft",
]
