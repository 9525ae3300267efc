"""lm-evaluation-harness on heft checkpoints: the model ``heft`` (``pip install heft[eval]``).

    heft lm-eval --model heft --model_args checkpoint=RUN_DIR_OR_CHECKPOINT --tasks ...

or from Python, after ``import heft.launcher.evaluate.lm_eval_model``::

    lm_eval.simple_evaluate(model="heft", model_args="checkpoint=...", tasks=[...])

lm-eval finds models only in its own registry (it has no plugin entry point for them), so the
``lm_eval`` command cannot know heft's; ``heft lm-eval`` is that command with heft registered.
Scores use heft's own forward (``launcher/evaluate/inference.py``) over the padded vocabulary, exactly as
transformers does on ``heft export-hf``'s output, so both give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import lm_eval.models  # noqa: F401  lm-eval's own models first: it fills a still-empty registry lazily
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from heft.launcher.evaluate.generate import Sampling, continue_tokens


@register_model("heft")
class HeftLM(TemplateLM):
    """Scores and generates with a heft checkpoint in this process."""

    def __init__(self, checkpoint: str | None = None, precision: str = "auto", max_gen_toks: int = 256,
                 **_lm_eval_kwargs):  # batch_size, device, ... which lm-eval passes every model
        super().__init__()
        from heft.launcher.evaluate.inference import LoadedModel

        if not checkpoint:
            raise ValueError("the heft model needs --model_args checkpoint=RUN_DIR_OR_CHECKPOINT")
        self.model = LoadedModel(checkpoint, precision=precision)
        self.max_length = self.model.seq_length
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.model.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.model.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.model.tokenizer.decode(tokens)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether it is the greedy continuation; the
        input is cut from the left to the model's seq_length, as lm-eval's own HF model does."""
        whole = (context + continuation)[-(self.max_length + 1):]
        inputs = torch.tensor([whole[:-1]], dtype=torch.long)
        logprobs = F.log_softmax(self.model.logits(inputs)[0], dim=-1).cpu()
        picked = logprobs[-len(continuation):]
        target = torch.tensor(continuation, dtype=torch.long)
        greedy = bool((picked.argmax(dim=-1) == target).all())
        return float(picked.gather(1, target.unsqueeze(1)).sum()), greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return [self._score(context, continuation)
                for _, context, continuation in tqdm(requests, disable=disable_tqdm, desc="heft scoring")]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="heft rolling"):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            results.append(sum(self._score(context, continuation)[0] for context, continuation in windows))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="heft generating"):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = Sampling(max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                                temperature=float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0)
            text, new = "", []
            for token in continue_tokens(self.model, self.tok_encode(context), sampling):
                new.append(token)
                text = self.tok_decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def main(argv: list[str] | None = None) -> int:
    """``heft lm-eval ARGS``: lm-eval's own command line with the ``heft`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from heft.launcher.checkpoint.files import CheckpointError

    sys.argv = ["lm_eval", *(argv if argv is not None else sys.argv[1:])]
    try:
        cli_evaluate()
    except (ValueError, CheckpointError, FileNotFoundError) as exc:  # heft's own one-line errors
        print(f"heft: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # datasets' "Couldn't reach ... on the Hub", also when offline
        tasks = _option(sys.argv, "--tasks") or "the tasks"
        print(f"heft: error: lm-eval could not load the data of {tasks} ({str(exc).splitlines()[0]}); "
              f"its datasets must be reachable or already in the Hugging Face cache (HF_HOME), or use "
              f"a task that reads local files (--include_path)", file=sys.stderr)
        return 2
    return 0


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in an lm-eval command line."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None
