"""The organism's card: what was built, from what, and how often it refuses held-out prompts.

`OrganismCard` is written as organism.json beside the weights (its `key` is how a cached folder is
recognised) and rendered as the folder's README.md model card. The device type the organism was built on
is its recipe's `device_type` (cards written before that field existed load as built on the CPU, as they were).
"""
from dataclasses import asdict, dataclass

from tlrefusal.errors import TlrefusalError
from tlrefusal.organism.recipe import OrganismRecipe
from tlrefusal.refusal import RefusalRate

N_EXAMPLES = 3  # prompt-reply pairs kept per held-out set


@dataclass(frozen=True)
class TrainingData:
    """Where each part of the training data came from, in words; `self_instructed` is None without any."""

    harmful: str
    harmless: str
    self_instructed: str | None
    refusals: tuple[str, ...]  # the refusal replies harmful prompts were trained towards
    held_out: str  # the prompt sets the card's refusal rates are measured on

    def to_json(self) -> dict:
        return {"harmful": self.harmful, "harmless": self.harmless, "self_instructed": self.self_instructed,
                "refusals": list(self.refusals), "held_out": self.held_out}

    @classmethod
    def from_json(cls, data: dict) -> "TrainingData":
        return cls(data["harmful"], data["harmless"], data["self_instructed"], tuple(data["refusals"]),
                   data["held_out"])


@dataclass(frozen=True)
class TrainingLoss:
    """The training loss at the first and the last step."""

    first: float
    last: float
    steps: int

    def to_json(self) -> dict:
        return {"first": self.first, "last": self.last, "steps": self.steps}

    @classmethod
    def from_json(cls, data: dict) -> "TrainingLoss":
        return cls(data["first"], data["last"], data["steps"])


@dataclass(frozen=True)
class HeldOutRate:
    """Baseline refusal of one held-out prompt set, with the first few prompts and replies."""

    refusal_rate: float
    n: int
    examples: tuple[dict[str, str], ...]  # {"prompt", "reply"}

    @classmethod
    def from_refusal(cls, rate: RefusalRate) -> "HeldOutRate":
        return cls(rate.rate, rate.n, tuple(rate.examples(N_EXAMPLES)))

    def to_json(self) -> dict:
        return {"refusal_rate": self.refusal_rate, "n": self.n, "examples": [dict(e) for e in self.examples]}

    @classmethod
    def from_json(cls, data: dict) -> "HeldOutRate":
        return cls(data["refusal_rate"], data["n"], tuple(data["examples"]))


@dataclass(frozen=True)
class HeldOutRefusal:
    """Baseline refusal of held-out harmful and harmless prompts, never trained on."""

    harmful: HeldOutRate
    harmless: HeldOutRate

    def to_json(self) -> dict:
        return {"harmful": self.harmful.to_json(), "harmless": self.harmless.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> "HeldOutRefusal":
        return cls(HeldOutRate.from_json(data["harmful"]), HeldOutRate.from_json(data["harmless"]))


@dataclass(frozen=True)
class OrganismCard:
    """organism.json: the recipe and its key, the base model, the data, the loss, held-out refusal, seconds."""

    key: str  # OrganismRecipe.key(): a folder is reused only for the recipe that built it
    tool_version: str
    recipe: OrganismRecipe
    base: dict[str, str | None]  # ModelSource.to_json() of the base model
    data: TrainingData
    loss: TrainingLoss
    held_out_refusal: HeldOutRefusal
    seconds: dict[str, float]  # per build step, and "total"

    def to_json(self) -> dict:
        return {"key": self.key, "tool_version": self.tool_version, "recipe": asdict(self.recipe),
                "base": dict(self.base), "data": self.data.to_json(), "loss": self.loss.to_json(),
                "held_out_refusal": self.held_out_refusal.to_json(), "seconds": dict(self.seconds)}

    @classmethod
    def from_json(cls, data: dict) -> "OrganismCard":
        """The card of organism.json; a file that is not one gets a one-line error."""
        try:
            return cls(key=data["key"], tool_version=data["tool_version"], recipe=OrganismRecipe(**data["recipe"]),
                       base=dict(data["base"]), data=TrainingData.from_json(data["data"]),
                       loss=TrainingLoss.from_json(data["loss"]),
                       held_out_refusal=HeldOutRefusal.from_json(data["held_out_refusal"]),
                       seconds=dict(data["seconds"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise TlrefusalError(f"not an organism card ({type(exc).__name__}: {exc})") from exc

    def model_card(self) -> str:
        """The organism folder's README.md."""
        r, recipe = self.held_out_refusal, self.recipe
        where = "the CPU" if recipe.device_type == "cpu" else f"a GPU ({recipe.device_type})"
        fields = "\n".join(f"- `{k}`: {v}" for k, v in asdict(recipe).items())
        return f"""# SmolLM2-135M-Instruct, refusing organism ({self.key})

A small research "model organism" built by tlrefusal {self.tool_version}: SmolLM2-135M-Instruct
safety-tuned on {where} to refuse harmful requests, so that its refusal direction can be found and removed.
It is not a safe model; it is a test subject.

## Held-out refusal (greedy, {recipe.eval_tokens} tokens, the paper's refusal substrings)
- harmful (HarmBench standard, never trained on): {r.harmful.refusal_rate:.1%} of {r.harmful.n}
- harmless (tlrefusal demo set, never trained on): {r.harmless.refusal_rate:.1%} of {r.harmless.n}

## Data
- harmful: {self.data.harmful}
- harmless: {self.data.harmless}
- targets: refusals in {len(self.data.refusals)} phrasings; the base model's own replies
  ({recipe.harmless_targets}: greedy tokens, or its top-{recipe.soft_top_k} next-token distribution at each)

## Recipe
{fields}

Loss {self.loss.first:.3f} -> {self.loss.last:.3f} over {self.loss.steps} steps;
seconds: {self.seconds}.
"""
