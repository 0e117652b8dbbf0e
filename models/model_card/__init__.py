"""The model card of a trained propensity model: what a model-risk review reads.

:func:`build_card` gathers, as one JSON-ready dict with stable keys, what a bank must
document about a model version: the data window and the kind of holdout, the products
and feature columns, the holdout metrics next to the baselines, calibration, metrics by
segment and by age band (so unequal performance is visible), and the training
parameters and library versions. The card is plain data: store it with the version and
render it later, without the model.

:func:`card_sections` lays a card out as headed sections of facts, tables and notes,
already formatted as text; :func:`render_text` turns them into rich renderables for the
command line (80 columns and up), and :func:`models.evaluation_report.write_report`
into HTML, so both show the same card.

Card layout (``format`` ``nbo-model-card``, ``format_version`` 1)
-----------------------------------------------------------------
Every key below is always present; a value that does not apply is None (or an empty
list), never a missing key. Dates are ISO ``YYYY-MM-DD``; rates and metrics are floats
in [0, 1]; NaN is written as None.

``model``
    ``as_of`` (training instant), ``horizon_days``, ``served`` (the served score,
    ``blend``), ``products``, ``lightgbm_products``, ``trees`` (walked per customer),
    ``feature_columns``.
``data``
    ``first_adoption``, ``plan`` (``monthly`` cutoffs or a ``single_cutoff``),
    ``training_cutoffs``, ``validation_cutoff``, ``validation`` (``later cutoff`` or
    ``random customers``), ``validation_fraction`` (of random customers, else None),
    ``as_of``, ``horizon_days``, ``customers``, ``adoptions`` (before ``as_of``),
    ``last_adoption``, ``window`` (the model's own record, as is).
``holdout``
    None without a holdout; else ``kind`` (``temporal`` or ``random_customers``, as the
    holdout says; ``temporal`` when it does not), ``cutoff``, ``end`` (exclusive),
    ``horizon_days``, ``model_as_of`` (the holdout model's training instant),
    ``fraction`` and ``seed`` (of a random holdout, else None), ``customers_scored``,
    ``customers_evaluated`` (who adopted a candidate product), ``adoptions``,
    ``candidate_pairs``, ``served``, ``baseline``.
``products``
    One dict per scored product: ``code``, ``name``, ``kind`` (``lightgbm`` or
    ``base_rate``), ``trees``, ``calibration``, ``blend``, ``base_rate``,
    ``train_rows``, ``train_positives``, ``validation_rows``, ``validation_positives``,
    ``validation_auc``.
``features``
    ``count``, ``numeric``, ``categorical``, ``columns`` (``name``, ``kind``,
    ``family``: ``held_<product>`` and the like for per-product columns, else the
    name), ``attributes`` (``name``, ``kind``: the bank's own columns).
``metrics``
    ``columns`` (comparison columns, in order), ``models`` (one dict per compared model:
    ``model``, ``reference`` and a value per column), ``products`` (the served score per
    product on the holdout: ``code``, ``candidates``, ``adopters``, ``base_rate``,
    ``auc``, ``pr_auc``, ``brier``, ``mean_predicted``, and ``top_hits`` and
    ``top_share``: adopters found in the top of the product's ranking and their share of
    its adopters, by top (``{"10%": ..., "20%": ...}``; empty when the holdout did not
    count them). Empty without a holdout.
``calibration``
    ``products``: ``code``, ``validation`` (``mean_predicted``, ``observed``, ``ece``,
    ``bins``: ``mean_predicted``, ``observed``, ``weight`` per bin of the training
    report, bins of one predicted value merged) and ``holdout`` (``mean_predicted``, ``observed`` or None); ``holdout_bins``
    (``bin``, ``count``, ``mean_predicted``, ``observed`` over every candidate pair) and
    ``holdout_ece``.
``groups``
    ``k``, ``min_adopters``, ``min_auc_cases`` and ``segment`` and ``age_band``, each
    ``available``, ``reason`` (why not, or None), ``overall`` and ``groups``: one dict
    per group with ``group``, ``customers``, ``adopters``, ``adoptions``, ``hit@k``,
    ``map@k``, ``baseline_map@k``, ``auc`` (product code to AUC or None) and
    ``skipped`` (why it was too small to measure, or None). Groups are the customers'
    ``segment`` (the largest first; beyond :attr:`CardConfig.max_segments` the smallest
    pooled as ``other``; no segment is ``unknown``) and their age at the holdout cutoff
    in :attr:`CardConfig.age_bands`.
``training``
    ``config`` (:meth:`TrainConfig.to_dict`), ``lightgbm`` (the booster parameters),
    ``seconds``.
``libraries``
    ``python``, ``nbo``, ``lightgbm``, ``numpy``, ``pandas``, ``scikit-learn``,
    ``mlxtend``.
``notes``
    Plain sentences a reviewer should read (a holdout too small, groups left out).
"""

from models.model_card.build import CARD_FORMAT, CARD_VERSION, CardConfig, build_card
from models.model_card.render import CardSection, CardTable, card_sections, render_text

__all__ = [
    "CARD_FORMAT",
    "CARD_VERSION",
    "CardConfig",
    "CardSection",
    "CardTable",
    "build_card",
    "card_sections",
    "render_text",
]
