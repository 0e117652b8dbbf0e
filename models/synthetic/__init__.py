"""A deterministic fake retail bank with its ground truth.

It feeds demos (``nbo generate``), tests, benchmarks and the simulation
(``service.simulation``) with data whose right answers are known. Serving never imports
it (``tests/test_layout.py`` holds the app to that).

The bank is drawn from a monthly hazard model: every customer belongs to a
hidden persona with its own base rate of adopting each product; bank
attributes (income, dependants, digital activity, ...) scale those rates;
planted *paths* multiply the rate of a product C while its antecedents A, B
are held (more when they were adopted in the given order), following a time
profile in months since the last antecedent was adopted. Products close at
per-product monthly rates and may be adopted again later.

:func:`generate_bank` simulates the bank month by month, vectorised over all
customers; :func:`true_propensities` is the oracle: from any date's state it
gives each customer's true probability of adopting each product within a
horizon. Both call the same private hazard function, so they cannot drift.

The modules, each building on those above it:

- ``dates``: day numbers and calendar months, the generator's unit of time.
- ``truth``: the hazard model as data (:class:`TruthModel`, :class:`OfferResponse`),
  stored as JSON.
- ``world``: the default bank's products, personas, effects and paths
  (``default_truth``).
- ``hazard``: the compiled model and the one hazard function everything shares.
- ``customers``: customers' attributes drawn by persona.
- ``generation``: :func:`generate_bank`, the history month by month, with offers.
- ``oracle``: :func:`true_propensities` and :func:`offer_acceptance`.
- ``live``: :class:`LiveBank`, the bank going on day by day for the simulation, and
  :class:`NpsRule`.
- ``files``: :func:`write_bank` and :func:`read_truth`.

Typical use::

    bank = generate_bank(50_000, seed=7)
    write_bank(bank, Path("data/bank"))          # import-format files + truth/
    truth, personas = read_truth(Path("data/bank"))
    oracle = true_propensities(truth, bank.customers, bank.adoptions, personas,
                               as_of=date(2025, 6, 30))
"""

from models.synthetic.customers import CUSTOMER_COLUMNS
from models.synthetic.dates import DAYS_PER_MONTH
from models.synthetic.files import read_truth, write_bank
from models.synthetic.generation import OUTCOME_VALUES, SyntheticBank, generate_bank
from models.synthetic.live import LiveBank, NpsRule
from models.synthetic.oracle import offer_acceptance, true_propensities
from models.synthetic.truth import OfferResponse, TruthModel

__all__ = [
    "CUSTOMER_COLUMNS",
    "DAYS_PER_MONTH",
    "OUTCOME_VALUES",
    "LiveBank",
    "NpsRule",
    "OfferResponse",
    "SyntheticBank",
    "TruthModel",
    "generate_bank",
    "offer_acceptance",
    "read_truth",
    "true_propensities",
    "write_bank",
]
