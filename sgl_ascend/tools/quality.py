"""What a quantized checkpoint costs in model quality, and why (`sgl-ascend verify --perplexity`).

verify runs one English passage through three models, in its own order:
- "reference": the --reference bf16 model (without one, the checkpoint's own float model stands in);
- "weight_only": the checkpoint's own float model (its dequantized weights, float activations), the
  simulation of weight error alone; the per-channel magnitude of every linear layer's input is taken
  here, as the quantizer sees it (after any smoothing the checkpoint carries);
- "served": the same model with every linear layer swapped for the served one (weights and
  activations quantized as the NPU ops do).
Perplexity of each, teacher-forced top-1 agreement and a greedy continuation against the reference
give the loss; weight_only splits it into weight error and activation error, and the outlier
channels (max/median of per-channel |x|) say which layers' activations are hard to quantize. The
advice names the msmodelslim algorithm that addresses what dominates.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from sgl_ascend.errors import CheckpointError

# An English passage written for this check (not in any calibration set): 424 SmolLM2 tokens with
# transformers 5 (430 with 4.51, which keeps the GGUF's pre-tokenizer sequence).
PASSAGE = (
    "The lighthouse at the end of the harbour was built more than a hundred years ago, when ships still "
    "carried coal and timber along the coast. Its keeper lived in a small stone house beside the tower "
    "and climbed the narrow stairs every evening to light the lamp. In winter the storms came from the "
    "north, and the waves were so high that they broke over the rocks and reached the windows of the "
    "house. The keeper wrote down the weather three times a day in a thick book with a green cover. "
    "Many of those books survive, and they tell us how the wind, the rain and the temperature changed "
    "over several decades.\n\n"
    "Today the light is automatic. A sensor switches it on at dusk, and a small computer sends a message "
    "to the port authority if the lamp fails. Nobody lives in the stone house any more; it has become a "
    "museum where visitors can read the old books, look at the brass instruments and climb to the top of "
    "the tower. On a clear day you can see the islands in the distance and the fishing boats returning "
    "in the afternoon.\n\n"
    "Scientists have used the keeper's records to study the climate of the region. By comparing his "
    "notes with modern measurements, they found that the average temperature in summer has risen by "
    "about one degree, and that strong storms have become less frequent but more intense. These results "
    "are not surprising, but they are valuable because the records are long, careful and written in "
    "the same place by the same kind of instrument. Data like these help researchers test the models "
    "they use to predict the future.\n\n"
    "The town has also changed. The harbour, once full of cargo ships, now serves mostly small boats and "
    "ferries that carry tourists to the islands. Old warehouses have been turned into restaurants, "
    "shops and apartments. Some people regret that the working port is gone, while others are glad that "
    "the town found a new way to earn its living. Everyone agrees, however, that the lighthouse should "
    "stay: it is the symbol of the town, printed on postcards, painted on the walls of the school and "
    "drawn by every child who has ever been asked to draw their home."
)
GREEDY_PROMPT = "The capital of France is"
GREEDY_TOKENS = 16
# A layer input whose largest per-channel |x| exceeds this many times the median channel's is listed
# as carrying outlier channels; 8-bit per-tensor scales lose most of the other channels' precision there.
OUTLIER_RATIO = 20.0
# Below this relative perplexity increase a part of the loss is not worth advice.
NEGLIGIBLE = 0.01


@dataclass
class OutlierLayer:
    prefix: str
    scheme: str
    ratio: float      # max over channels of max_t |x[t, c]|, divided by the median channel's
    channel: int      # the channel holding the maximum


@dataclass
class QualityReport:
    tokens: int
    perplexity: Dict[str, float]          # reference / weight_only / served
    top1_agreement: float                 # served vs reference next-token argmax over the passage
    greedy: Dict[str, object]             # prompt, reference and served continuations, agreeing tokens
    weight_loss: float                    # weight_only perplexity / reference - 1
    activation_loss: float                # served / weight_only - 1
    outliers: List[OutlierLayer] = field(default_factory=list)
    advice: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.perplexity["served"] / self.perplexity["reference"] - 1

    def to_json(self) -> dict:
        return {**asdict(self), "loss": self.loss}


class PassageProbe:
    """Runs the passage and the greedy prompt through each model handed to `run`."""

    def __init__(self, tokenizer_path: str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
            raise CheckpointError(f"--perplexity needs the model's tokenizer, which does not load ({exc}); copy the "
                                  "original model's tokenizer files into the checkpoint folder.",
                                  file=tokenizer_path) from exc
        self.tokenizer = tokenizer
        self.ids = torch.tensor([tokenizer(PASSAGE)["input_ids"]], dtype=torch.long)
        self.prompt_ids = tokenizer(GREEDY_PROMPT)["input_ids"]
        self.runs: Dict[str, dict] = {}
        self.channel_absmax: Dict[str, torch.Tensor] = {}

    def run(self, name: str, model: torch.nn.Module, inputs: Optional[Dict[str, str]] = None) -> None:
        """inputs: layer prefix -> module name whose input to measure per channel (weight_only run)."""
        hooks = [model.get_submodule(module).register_forward_pre_hook(
            lambda _m, args, key=prefix: self._absmax(key, args[0])) for prefix, module in (inputs or {}).items()]
        with torch.no_grad():
            logits = model(input_ids=self.ids).logits[0, :-1].float()
        for h in hooks:
            h.remove()
        nll = F.cross_entropy(logits, self.ids[0, 1:]).item()
        self.runs[name] = {"nll": nll, "argmax": logits.argmax(-1), "greedy": self._greedy(model)}

    def _absmax(self, key: str, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        self.channel_absmax[key] = a if key not in self.channel_absmax else torch.maximum(self.channel_absmax[key], a)

    def _greedy(self, model: torch.nn.Module) -> List[int]:
        ids = list(self.prompt_ids)
        with torch.no_grad():
            for _ in range(GREEDY_TOKENS):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(self.prompt_ids):]

    def report(self, schemes: Dict[str, str], has_reference: bool) -> QualityReport:
        """schemes: layer prefix -> served scheme name."""
        runs = self.runs
        ref = runs.get("reference", runs["weight_only"])
        ppl = {"reference": math.exp(ref["nll"]), "weight_only": math.exp(runs["weight_only"]["nll"]),
               "served": math.exp(runs["served"]["nll"])}
        agree = 0
        for a, b in zip(runs["served"]["greedy"], ref["greedy"]):
            if a != b:
                break
            agree += 1
        greedy = {"prompt": GREEDY_PROMPT, "reference": self.tokenizer.decode(ref["greedy"]),
                  "served": self.tokenizer.decode(runs["served"]["greedy"]), "agreeing_tokens": agree,
                  "of": GREEDY_TOKENS}
        outliers = []
        for prefix, a in self.channel_absmax.items():
            ratio = (a.max() / a.median().clamp_min(1e-12)).item()
            if ratio >= OUTLIER_RATIO:
                outliers.append(OutlierLayer(prefix, schemes.get(prefix, "?"), ratio, int(a.argmax())))
        outliers.sort(key=lambda o: -o.ratio)
        q = QualityReport(int(self.ids.shape[1]), ppl,
                          (runs["served"]["argmax"] == ref["argmax"]).float().mean().item(), greedy,
                          ppl["weight_only"] / ppl["reference"] - 1, ppl["served"] / ppl["weight_only"] - 1,
                          outliers)
        if not has_reference:
            q.notes.append("no --reference: the checkpoint's own float model is the reference, so the weight error "
                           "is not measured (pass the original bf16 model)")
        q.advice = advise(q, schemes)
        return q


def _activation_kind(scheme: str) -> str:
    """'none' (weight-only), 'int4', 'per_token' (dynamic) or 'per_tensor' (static) activations."""
    s = scheme.upper()
    if "A16" in s or s in ("FLOAT", "UNQUANTIZED"):
        return "none"
    if "A4" in s:
        return "int4"
    return "per_token" if "DYNAMIC" in s else "per_tensor"


# linear layer -> (its name, the msmodelslim smoothing subgraph that moves its input's scales into the layer
# before it): the inputs an RMSNorm cannot smooth
_SMOOTH_PAIR = {"down_proj": ("down_proj", "up-down"), "o_proj": ("o_proj", "ov")}


def advise(q: QualityReport, schemes: Dict[str, str]) -> List[str]:
    """Which msmodelslim algorithm addresses the larger part of the loss."""
    advice = []
    kinds = {_activation_kind(s) for s in schemes.values()}
    worst = q.outliers[0] if q.outliers else None
    if q.activation_loss >= NEGLIGIBLE and q.activation_loss >= q.weight_loss:
        where = (f"{len(q.outliers)} layer input(s) carry outlier channels (worst {worst.prefix} channel "
                 f"{worst.channel} at {worst.ratio:.0f}x the median)" if worst else
                 "no layer input has a channel beyond "
                 f"{OUTLIER_RATIO:.0f}x its median, so the activation bits themselves are short")
        advice.append(f"activation quantization costs {q.activation_loss:+.1%} perplexity; {where}.")
        if "int4" in kinds:
            advice.append("4-bit activations cannot hold such channels: rotate first (msmodelslim QuaRot), then "
                          "flex_smooth; or keep activations at 8 bits (W4A8_DYNAMIC / W8A8_DYNAMIC).")
        if "per_tensor" in kinds:
            advice.append("static W8A8 has one activation scale per tensor: smooth the outliers into the weights "
                          "(msmodelslim smooth_quant / iter_smooth / flex_smooth), or use per-token activations "
                          "(W8A8_DYNAMIC).")
            pairs = {_SMOOTH_PAIR.get(o.prefix.rsplit(".", 1)[-1]) for o in q.outliers}
            if pairs and None not in pairs:
                # seen on SmolLM2 after iter_smooth through msmodelslim's default adapter: only down_proj
                # inputs kept their outliers, and the loss barely moved
                advice.append(f"every listed input feeds {' / '.join(sorted(p[0] for p in pairs))}, which a norm "
                              f"cannot smooth: only the {' / '.join(sorted(p[1] for p in pairs))} subgraph does "
                              "(iter_smooth / flex_smooth enable_subgraph_type, through a model adapter that maps "
                              "it; msmodelslim's default adapter finds norm-linear pairs only), or keep these "
                              "layers out of static W8A8 (the recipe's exclude).")
        if kinds & {"per_token"} and not kinds & {"int4", "per_tensor"}:
            advice.append("per-token int8 activations still share one scale across channels: smooth_quant / "
                          "iter_smooth, or keep the listed layers weight-only (W8A16) through the recipe's exclude.")
    if q.weight_loss >= NEGLIGIBLE and q.weight_loss > q.activation_loss:
        advice.append(f"weight quantization costs {q.weight_loss:+.1%} perplexity: better rounding (msmodelslim "
                      "autoround or GPTQ), per-group scales for int4 weights, or int8 weights (W8A16 / W8A8_DYNAMIC) "
                      "for the sensitive layers.")
    if not advice:
        advice.append(f"the loss ({q.loss:+.1%} perplexity) is negligible: nothing to fix.")
    return advice


def format_quality(q: QualityReport) -> List[str]:
    p = q.perplexity
    g = q.greedy
    lines = [f"perplexity on the built-in English passage ({q.tokens} tokens): reference {p['reference']:.2f}, "
             f"weight-only {p['weight_only']:.2f}, served {p['served']:.2f} ({q.loss:+.1%}; weight error "
             f"{q.weight_loss:+.1%}, activation error {q.activation_loss:+.1%})",
             f"top-1 agreement with the reference over the passage {q.top1_agreement:.3f}",
             f"greedy {g['prompt']!r}: reference {g['reference']!r}, served {g['served']!r} "
             f"({g['agreeing_tokens']}/{g['of']} tokens agree)"]
    if q.outliers:
        lines.append(f"layer inputs with outlier channels (max/median of per-channel |x| >= {OUTLIER_RATIO:.0f}):")
        lines += [f"  {o.prefix} ({o.scheme}): channel {o.channel} at {o.ratio:.1f}x" for o in q.outliers[:10]]
        if len(q.outliers) > 10:
            lines.append(f"  ... and {len(q.outliers) - 10} more")
    lines += [f"advice: {a}" for a in q.advice] + [f"note: {n}" for n in q.notes]
    return lines
