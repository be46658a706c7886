"""Turn-key continued pretraining of a causal LM (Pythia by default) with ``BayesMergeCallback``.

One call of :func:`run` (or ``merge-callback-recipe --config CONFIG.yaml``) loads a model with
``AutoModelForCausalLM.from_pretrained(name_or_path, revision=...)``, tokenises and packs local
text files (or a ``datasets`` dataset), trains it with PyTorch Lightning while
:class:`~merge_callback.lightning.BayesMergeCallback` merges every new checkpoint with the previous
one, and writes into the run folder:

- ``checkpoints/step=N.ckpt``: the newest training checkpoints (``keep_checkpoints``);
- ``soups/soup-step=N.safetensors`` (+ ``.json``): the soups and their λ;
- ``final_soup/``: the last round's soup as a Hugging Face folder (model + tokenizer);
- ``report.md`` with ``lambda.png``, ``heldout.png`` and ``curve.png``; ``rounds.json``;
- ``config.yaml``: the resolved configuration; ``logs/``: CSV metrics (and W&B when installed).

With ``model: scratch`` a small Pythia-architecture GPT-NeoX is first pretrained from scratch on the
training text and saved with ``save_pretrained`` to ``base_model/``; the continued pretraining then
loads it from that folder exactly as it would load a hub model.

Every input is checked (config, paths, a writable ``output_dir``), the data read and the model
loaded before anything is written; bad input ends as ``merge-callback-recipe: error: ...`` with
exit code 2. A folder that already holds a run needs ``--resume`` or ``--overwrite``.

Modules: :mod:`~merge_callback.recipe.config` (:class:`RecipeConfig`, the YAML reader),
:mod:`~merge_callback.recipe.data` (texts, tokenising and packing, data loaders),
:mod:`~merge_callback.recipe.model` (loading, the ``scratch`` base model, exporting a soup),
:mod:`~merge_callback.recipe.callbacks` (progress bar, out-of-domain scores, pruning),
:mod:`~merge_callback.recipe.console` (the recipe's own lines, quieted third-party messages),
:mod:`~merge_callback.recipe.loggers` (CSV, W&B), :mod:`~merge_callback.recipe.checks` (paths),
:mod:`~merge_callback.recipe.report` (``report.md``, plots), :mod:`~merge_callback.recipe.runner`
(prepare and execute a run, resume, overwrite) and :mod:`~merge_callback.recipe.command`
(:func:`main`).
"""

from merge_callback.recipe.callbacks import OutOfDomainCallback, StepProgressBar
from merge_callback.recipe.command import PROG, main
from merge_callback.recipe.config import (BUILTIN_DATA, RecipeConfig, RecipeError, dump_config,
                                          load_config, read_yaml_mapping)
from merge_callback.recipe.data import RecipeData, load_texts, prepare_data
from merge_callback.recipe.model import export_soup, load_model_and_tokenizer, pretrain_base_model
from merge_callback.recipe.report import write_report
from merge_callback.recipe.runner import RESUME_MAY_CHANGE, RUN_OUTPUTS, run

__all__ = ["RecipeConfig", "RecipeData", "RecipeError", "load_config", "read_yaml_mapping",
           "load_model_and_tokenizer", "load_texts", "prepare_data", "pretrain_base_model",
           "OutOfDomainCallback", "StepProgressBar", "export_soup", "write_report", "dump_config",
           "run", "main", "BUILTIN_DATA", "RUN_OUTPUTS", "RESUME_MAY_CHANGE", "PROG"]
