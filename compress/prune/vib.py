"""``prune.vib``: VTrans structured pruning of transformers to a size budget.

The pass prunes the recipe's model (a Hugging Face BERT-family encoder or a
GPT-2 style decoder, loaded with an ``hf:`` source) on the train split, cuts
the pruned heads, FFN neurons and hidden dimensions out of the weights, and
records the new shape in the artifact's builder so the smaller model reloads
and exports like any other torch artifact. See :mod:`.search` for the method.
"""

from __future__ import annotations

from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.passes import Pass, PassContext

from .config import PruneSettings


class PruneVIB(Pass):
    """VIB structured pruning (VTrans, Fast-/Faster-VTrans) or an importance baseline, to a budget."""

    name = "prune.vib"
    kind = "compress"
    Config = PruneSettings
    accepts = ("torch",)
    uses_data = ("train",)
    comes_before = ("quantize.",)  # it cuts float weight matrices; quantized layers carry their own scales

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import torch

        from .search import prune_model

        cfg: PruneSettings = self.config
        transforms = list((artifact.builder or {}).get("transforms", []))
        if any(t.get("kind") != "prune" for t in transforms):
            raise UserError(f"{ctx.path or 'prune.vib'} must come before quantization and other model changes; move it to the start of compress:")
        if ctx.data is None:
            raise UserError("prune.vib trains on data.train; add a data: section (unlabelled text is enough, e.g. data: {source: text:sentences.txt})")
        split = ctx.data.split("train")
        names = [s.name for s in artifact.inputs]
        missing = [n for n in names if n not in split.arrays]
        if missing:
            raise UserError(f"the train data has no {', '.join(missing)}; use a text: source tokenized for this model")
        data = {n: torch.from_numpy(split.arrays[n]) for n in names}
        if split.labels is not None:
            data["labels"] = torch.from_numpy(split.labels)
        seq = cfg.seq or int(ctx.dims.get("seq", 128))
        result = prune_model(artifact.torch_module(), data, cfg, seq=seq, seed=ctx.seed, log=ctx.log)
        ctx.metrics["prune"] = result.metrics
        builder = dict(artifact.builder or {})
        builder["transforms"] = [*transforms, {"kind": "prune", "args": {"structure": result.structure}}]
        return artifact.derive(module=result.model, builder=builder)
