"""``train.seq2seq`` (train a text-to-text model on source -> target pairs) and
``distill.encdec`` (distill a decoder-only teacher into an encoder-decoder student).

Both cache their final weights under the step key in the shared cache folder, keep
a checkpoint while training (a rerun of a killed recipe resumes from it) and
report exact-match accuracy on the eval split as training goes.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from edgekit.artifact import Artifact
from edgekit.compress import weights_cache
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, PassContext


class _TrainSettings(PassConfig):
    steps: int = Field(1500, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="pairs per step")
    lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate (warm-up, cosine decay)")
    weight_decay: float = Field(0.01, ge=0)
    eval_samples: int = Field(256, ge=0, description="eval pairs scored (exact match of greedy answers) during and after training; 0: skip")
    eval_every: int = Field(500, ge=0, description="score the eval pairs every N steps (0: only at the end)")
    checkpoint_every: int = Field(250, ge=0, description="save a resumable checkpoint every N steps (0: never)")
    cache: bool = Field(True, description="reuse weights trained earlier with the same model, data and config")


class TrainSeq2SeqConfig(_TrainSettings):
    pass


class DistillEncDecConfig(_TrainSettings):
    encoder_layers: int | None = Field(None, ge=1, description="student encoder depth (default: 2/3 of the teacher's layers)")
    decoder_layers: int | None = Field(None, ge=1, description="student decoder depth (default: the rest of the teacher's layers)")
    match_params: bool = Field(True, description="narrow the student's FFN so it has no more parameters than the teacher")
    init: Literal["teacher", "random"] = Field("teacher", description="start the student from the teacher's weights (teacher) or from scratch (random)")
    targets: Literal["data", "teacher"] = Field(
        "data", description="y to distil on: the data's target_ids, or the teacher's own greedy answers to the train sources (sequence-level KD; no labels needed)"
    )
    alpha: float = Field(0.9, ge=0, le=1, description="weight of KL(teacher || student); 1 - alpha weighs cross-entropy to the gold target")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term (scaled by T^2)")


class TrainSeq2Seq(Pass):
    """Train a decoder-only or encoder-decoder LM (e.g. zoo:event_log_teacher) on source -> target pairs; loss on the target only."""

    name = "train.seq2seq"
    kind = "compress"
    Config = TrainSeq2SeqConfig
    accepts = ("torch",)
    uses_data = ("train",)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from .kd import target_ce
        from .pairs import check_vocab, pairs_of, target_logits

        cfg: TrainSeq2SeqConfig = self.config
        model = copy.deepcopy(_text_model(artifact, self.name))
        pairs = pairs_of(ctx, "train", self.name)
        check_vocab(pairs, model.cfg.vocab, self.name)

        def loss_fn(batch):
            ce = target_ce(target_logits(model, batch), batch.target, model.cfg.pad)
            return ce, {}

        ctx.metrics["train"] = _train_cached(model, pairs, loss_fn, cfg, ctx, self.name)
        return artifact.derive(module=model)


class DistillEncDec(Pass):
    """Distil a decoder-only teacher (zoo or hf: Llama-family causal LM) into an encoder-decoder student of the same size."""

    name = "distill.encdec"
    kind = "compress"
    Config = DistillEncDecConfig
    accepts = ("torch",)
    uses_data = ("train",)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import torch

        from edgekit.models.encdec import EncoderDecoderLM, config_dict, count_params, init_student_from_teacher, student_config

        from .kd import kd_loss
        from .pairs import check_vocab, pairs_of, target_logits

        cfg: DistillEncDecConfig = self.config
        teacher = _text_model(artifact, self.name)
        if getattr(teacher, "kind", None) != "decoder":
            raise UserError(f"{self.name} distils a decoder-only teacher, but the model is an encoder-decoder already; drop this step")
        teacher.eval()
        pairs = pairs_of(ctx, "train", self.name)
        check_vocab(pairs, teacher.cfg.vocab, self.name)
        agreement = None
        if cfg.targets == "teacher":
            from .pairs import Pairs, teacher_targets

            ctx.log(f"  generating the teacher's answers to {len(pairs)} train sources")
            produced = teacher_targets(teacher, pairs)
            agreement = float((produced == pairs.target).all(-1).float().mean())
            pairs = Pairs(pairs.source, pairs.source_mask, produced)
        student_cfg = student_config(teacher.cfg, cfg.encoder_layers, cfg.decoder_layers, cfg.match_params)
        with torch.random.fork_rng():
            torch.manual_seed(ctx.seed)
            student = EncoderDecoderLM(student_cfg)
        if cfg.init == "teacher":
            init_student_from_teacher(student, teacher)
        sizes = {"teacher_params": count_params(teacher), "student_params": count_params(student)}
        ctx.log(
            f"  student: {student_cfg.enc_layers} encoder + {student_cfg.dec_layers} decoder layers, FFN {student_cfg.ffn}; "
            f"{sizes['student_params']:,} parameters (teacher {teacher.cfg.layers} layers, {sizes['teacher_params']:,})"
        )

        def loss_fn(batch):
            with torch.no_grad():
                t_logits = target_logits(teacher, batch)
            return kd_loss(target_logits(student, batch), t_logits, batch.target, student_cfg.pad, cfg.alpha, cfg.temperature)

        metrics = _train_cached(student, pairs, loss_fn, cfg, ctx, self.name)
        if cfg.eval_samples and ctx.data.has_split("eval"):
            from .pairs import exact_match

            metrics["teacher_eval"] = exact_match(teacher, pairs_of(ctx, "eval", self.name).rows(slice(0, cfg.eval_samples)))
        ctx.metrics["distill"] = {
            **sizes,
            "teacher_layers": teacher.cfg.layers,
            "encoder_layers": student_cfg.enc_layers,
            "decoder_layers": student_cfg.dec_layers,
            "student_ffn": student_cfg.ffn,
            "teacher_ffn": teacher.cfg.ffn,
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "init": cfg.init,
            "targets": cfg.targets,
            **({"teacher_targets_match_data": round(agreement, 4)} if agreement is not None else {}),
            **metrics,
        }
        return artifact.derive(
            module=student,
            builder={"kind": "zoo", "name": "encdec_lm", "args": config_dict(student_cfg)},
            outputs=["logits"],
        )


def _text_model(artifact: Artifact, pass_name: str):
    model = artifact.torch_module()
    if getattr(model, "kind", None) not in ("decoder", "encdec") or not hasattr(model, "cfg"):
        raise UserError(
            f"{pass_name} works on edgekit's text-to-text LMs (zoo:event_log_teacher, decoder_lm, encdec_lm, or an hf: Llama/Qwen2/Mistral causal LM), "
            f"not {type(model).__name__}; pick one of those as model.source"
        )
    return model


def _train_cached(model, pairs, loss_fn, cfg: _TrainSettings, ctx: PassContext, pass_name: str) -> dict:
    """Train (or load the weights an earlier run trained under this step key); metrics."""
    from .loop import fit
    from .pairs import exact_match, pairs_of

    eval_pairs = None
    if cfg.eval_samples and ctx.data is not None and ctx.data.has_split("eval"):
        eval_pairs = pairs_of(ctx, "eval", pass_name).rows(slice(0, cfg.eval_samples))
    cache_file = weights_cache.cache_file(ctx, cfg.cache)
    if weights_cache.load_cached(model, cache_file, ctx, pass_name):
        metrics: dict = {"cached": True, "weights": str(cache_file)}
    else:
        checkpoint = ctx.cache_dir / "checkpoints" / f"{ctx.key}.pt" if (ctx.cache_dir and ctx.key) else None
        log = fit(
            model, pairs, loss_fn, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
            seed=ctx.seed, ctx=ctx, what=pass_name, checkpoint=checkpoint, checkpoint_every=cfg.checkpoint_every,
            eval_pairs=eval_pairs, eval_every=cfg.eval_every or cfg.steps,
        )
        weights_cache.save_cached(model, cache_file)
        metrics = {"cached": False, "steps": cfg.steps, "pairs": len(pairs), **log.summary()}
    model.eval()
    if eval_pairs is not None:
        metrics["eval"] = exact_match(model, eval_pairs)
        ctx.log(f"  {pass_name}: exact match {metrics['eval']['exact_match']:.2f}% on {len(eval_pairs)} eval pairs")
    return metrics
