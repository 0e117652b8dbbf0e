"""A closed-loop simulation of nbo on the synthetic bank: the demonstration before going live.

:func:`run_simulation` generates a synthetic bank (:mod:`models.synthetic`), imports it
into a fresh database, trains and activates a model, and then lives through
``days`` days. Every day a sample of customers visits their branch; each visit asks the
real decision API (in-process, through Starlette's ``TestClient`` on
:func:`service.app.create_app`, with the serving clock set to the simulated day) for
offers; the customer answers every offer by the ground truth
(:class:`models.synthetic.LiveBank`: accept with their true propensity, else decline or
"not now") and the answers go back through ``POST /v1/offers/{id}/outcome``; some
customers answer an NPS survey (``POST /v1/feedback``), detractors more often after
irrelevant offers; the adoptions the ground truth draws for every customer, treated or
control, are pushed through ``POST /v1/adoptions``. Every ``retrain_every_days`` the
model is retrained on the database (:func:`service.training.train_and_register`, so
recorded outcomes are learnt from) and, when the promotion gate lets it, activated
through ``POST /v1/models/{version}/activate``: the service swaps versions live.

At the end, :mod:`service.reports.measures` measures conversion, uplift against the control
group and NPS, exactly as for a real bank. The generator knows the truth the uplift
estimates: every customer has a counterfactual twin with the same random draws who is
never offered anything, and the true uplift is the treated customers' adoption rate
minus their twins', computed with the report's own definitions
(:func:`service.reports.measures.uplift_table`). A sound experiment puts the true value inside
the measured confidence interval.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from models.propensity import TrainConfig
from models.synthetic import (
    LiveBank,
    NpsRule,
    OfferResponse,
    SyntheticBank,
    generate_bank,
    write_bank,
)
from service.app import create_app
from service.auth import create_key
from service.data import db
from service.data.importing import import_adoptions, import_customers, import_products
from service.reports import measures as reports
from service.settings import Settings
from service.training import train_and_register

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``."""

SIMULATION_TRAIN_CONFIG = TrainConfig(n_cutoffs=4, max_rounds=120)
"""Weekly retraining in a simulation: fewer cutoffs and rounds than a production run."""


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of :func:`run_simulation`.

    Attributes
    ----------
    customers : int
        Customers of the synthetic bank.
    days : int
        Simulated days, from ``start``.
    seed : int
        Seeds the bank, the visits and the customers' answers: the same settings give
        the same simulation.
    start : datetime.date
        First simulated day; the bank's history ends the day before.
    history_start : datetime.date
        First day of the bank's history.
    visits_per_month : float
        Branch visits per customer per month (each day a customer visits with
        probability ``visits_per_month / 30.4375``).
    control_share : float
        Share of customers in the control group (production's default is 5%; a
        simulation needs more for an informative interval).
    max_offers : int
        Offers asked for per visit.
    feedback_share : float
        Share of visits after which the customer answers an NPS survey.
    retrain_every_days : int
        Days between retrainings (0: never).
    uplift_window_days : int
        Adoption window after the first contact, for the uplift report.
    horizon_days : int
        The model's propensity horizon.
    staff_per_branch : int
        Tellers per branch (a visit is served by one at random).
    offer_response : OfferResponse
        How the simulated customers answer offers (the planted effect of an offer).
    feedback : NpsRule
        How they answer the NPS survey.
    train_config : TrainConfig
        Settings of every training.
    promotion_tolerance : float
        Tolerance of the promotion gate (see ``NBO_PROMOTION_TOLERANCE``).
    """

    customers: int = 5_000
    days: int = 60
    seed: int = 0
    start: dt.date = dt.date(2026, 1, 1)
    history_start: dt.date = dt.date(2019, 1, 1)
    visits_per_month: float = 0.5
    control_share: float = 0.3
    max_offers: int = 3
    feedback_share: float = 0.3
    retrain_every_days: int = 7
    uplift_window_days: int = 30
    horizon_days: int = 90
    staff_per_branch: int = 4
    offer_response: OfferResponse = field(default_factory=OfferResponse)
    feedback: NpsRule = field(default_factory=NpsRule)
    train_config: TrainConfig = SIMULATION_TRAIN_CONFIG
    promotion_tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.customers < 1 or self.days < 1:
            raise ValueError("a simulation needs at least one customer and one day")
        if not 0.0 <= self.control_share <= 1.0 or not 0.0 <= self.feedback_share <= 1.0:
            raise ValueError("control_share and feedback_share must be in [0, 1]")
        if self.visits_per_month < 0 or self.retrain_every_days < 0:
            raise ValueError("visits_per_month and retrain_every_days must be >= 0")

    @property
    def period(self) -> reports.Period:
        """The simulated days."""
        return reports.Period(self.start, self.start + dt.timedelta(days=self.days - 1))


@dataclass(frozen=True)
class Retraining:
    """One retraining during the simulation."""

    day: dt.date
    version: str
    activated: bool
    reason: str
    holdout_map3: float | None


@dataclass(frozen=True)
class SimulationResult:
    """What a simulation measured, next to the truth it was generated from.

    Attributes
    ----------
    config : SimulationConfig
    work_dir : pathlib.Path
        The bank, the database and the model versions.
    visits, decisions_with_offers, adoptions_organic, adoptions_offer : int
        Counts over the simulated days (organic adoptions of every customer; adoptions
        through accepted offers).
    conversion : service.reports.measures.ConversionReport
        By product.
    uplift : service.reports.measures.UpliftReport
        Treated versus control, per product and for any product.
    nps : service.reports.measures.NpsReport
        By branch.
    true_uplift : service.reports.measures.UpliftReport
        The same report with the treated customers' counterfactual twins (same random
        draws, never offered anything) in the place of the control group: its
        ``difference`` is the true effect of the offers on the treated customers.
    retrainings : list of Retraining
    seconds : float
        Wall-clock time.
    """

    config: SimulationConfig
    work_dir: Path
    visits: int
    decisions_with_offers: int
    adoptions_organic: int
    adoptions_offer: int
    conversion: reports.ConversionReport
    uplift: reports.UpliftReport
    nps: reports.NpsReport
    true_uplift: reports.UpliftReport
    retrainings: list[Retraining]
    seconds: float

    def true_difference(self, product_code: str = reports.ANY_PRODUCT) -> float | None:
        """The true uplift of a product (default: any product)."""
        return _row(self.true_uplift, product_code).difference

    def recovered(self, product_code: str = reports.ANY_PRODUCT) -> bool:
        """Whether the measured confidence interval holds the true uplift."""
        measured = _row(self.uplift, product_code)
        truth = self.true_difference(product_code)
        if measured.ci_low is None or measured.ci_high is None or truth is None:
            return False
        return measured.ci_low <= truth <= measured.ci_high


def _row(report: reports.UpliftReport, product_code: str) -> reports.UpliftRow:
    if product_code == reports.ANY_PRODUCT:
        return report.total
    for row in report.rows:
        if row.product_code == product_code:
            return row
    raise KeyError(product_code)


class _Api:
    """The service in-process, driven as a bank's systems would, on a simulated clock."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"}
        self.now = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        client.app.state.serving.clock = lambda: self.now  # type: ignore[attr-defined]

    def post(self, url: str, body: dict[str, Any]) -> Any:
        response = self.client.post(url, json=body, headers=self.headers)
        if response.status_code >= 400:
            raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text}")
        return response.json()


def run_simulation(
    config: SimulationConfig, work_dir: Path, *, progress: ProgressFn | None = None
) -> SimulationResult:
    """Run the closed loop (see the module docstring) in ``work_dir``.

    Parameters
    ----------
    config : SimulationConfig
    work_dir : pathlib.Path
        An empty or missing folder: the bank goes to ``bank/``, the SQLite database to
        ``nbo.sqlite3``, model versions to ``models/``.
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    SimulationResult
    """
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    work_dir = Path(work_dir)
    if (work_dir / "nbo.sqlite3").exists():
        raise FileExistsError(f"{work_dir} already holds a simulation; use an empty folder")
    work_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([config.seed, 0x5117])

    report("generating the bank", 0, 1)
    bank = generate_bank(
        config.customers,
        config.seed,
        start=config.history_start,
        end=config.start - dt.timedelta(days=1),
        offer_response=config.offer_response,
    )
    files = write_bank(bank, work_dir / "bank")
    url = f"sqlite:///{(work_dir / 'nbo.sqlite3').resolve()}"
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        report("importing the bank", 0, 1)
        import_products(engine, files["products"])
        import_customers(engine, files["customers"])
        import_adoptions(engine, files["adoptions"])
        report("training the first model", 0, 1)
        first = _retrain(engine, config, work_dir, config.start)
        with db.unit_of_work(engine) as session:
            key = create_key(session, name="simulation", scopes=["admin"])
        settings = Settings(
            database_url=url,
            data_dir=work_dir,
            control_share=config.control_share,
            # One in-process worker: nothing to poll for; "today" is the simulated day.
            poll_interval_seconds=86_400.0,
            workers=1,
            scoring_date=None,
        )
        live = LiveBank(bank, seed=config.seed)
        with TestClient(create_app(settings)) as client:
            api = _Api(client, key)
            loop = _Loop(config, live, api, rng, bank)
            retrainings = [first]
            for i in range(config.days):
                day = config.start + dt.timedelta(days=i)
                report(f"day {day}", i, config.days)
                loop.live_day(day)
                every = config.retrain_every_days
                if every and (i + 1) % every == 0 and i + 1 < config.days:
                    report(f"day {day}: retraining", i + 1, config.days)
                    retrainings.append(_retrain_live(engine, config, work_dir, day, api))
            report("measuring", config.days, config.days)
        period = config.period
        conversion = reports.conversion(
            engine, period, by="product", adoption_window_days=config.uplift_window_days
        )
        uplift = reports.uplift(engine, period, window_days=config.uplift_window_days)
        nps = reports.nps(engine, period, by="branch")
    finally:
        engine.dispose()
    return SimulationResult(
        config=config,
        work_dir=work_dir,
        visits=loop.visits,
        decisions_with_offers=loop.with_offers,
        adoptions_organic=sum(1 for *_, source in live.adoptions if source == "organic"),
        adoptions_offer=sum(1 for *_, source in live.adoptions if source == "offer"),
        conversion=conversion,
        uplift=uplift,
        nps=nps,
        true_uplift=true_uplift(live, bank, loop.first_contacts, config),
        retrainings=retrainings,
        seconds=time.perf_counter() - started,
    )


class _Loop:
    """The simulated days: visits, answers, feedback, adoptions."""

    def __init__(
        self,
        config: SimulationConfig,
        live: LiveBank,
        api: _Api,
        rng: np.random.Generator,
        bank: SyntheticBank,
    ) -> None:
        self.config = config
        self.live = live
        self.api = api
        self.rng = rng
        self.branches = bank.customers["branch_id"].astype(str).to_numpy(dtype=object)
        self.first_contacts: dict[str, tuple[dt.date, bool]] = {}
        self.visits = 0
        self.with_offers = 0

    def live_day(self, day: dt.date) -> None:
        config, live, rng = self.config, self.live, self.rng
        chance = config.visits_per_month / 30.4375
        visitors = np.flatnonzero(rng.random(len(live.customer_ids)) < chance)
        rng.shuffle(visitors)
        opening = dt.datetime.combine(day, dt.time(9), tzinfo=dt.UTC)
        step = dt.timedelta(seconds=max(1, (9 * 3600) // max(len(visitors), 1)))
        for k, position in enumerate(visitors):
            self.api.now = opening + k * step
            self.visit(str(live.customer_ids[position]), str(self.branches[position]), day)
        self.api.now = dt.datetime.combine(day, dt.time(20), tzinfo=dt.UTC)
        adopted = live.end_day()
        for chunk in range(0, len(adopted), 1000):
            rows = adopted[chunk : chunk + 1000]
            self.api.post(
                "/v1/adoptions",
                {
                    "adoptions": [
                        {"customer_id": c, "product_code": p, "adopted_at": day.isoformat()}
                        for c, p in rows
                    ]
                },
            )

    def visit(self, customer: str, branch: str, day: dt.date) -> None:
        config, live, rng = self.config, self.live, self.rng
        staff = f"{branch}-S{int(rng.integers(1, config.staff_per_branch + 1))}"
        answer = self.api.post(
            f"/v1/customers/{customer}/decisions",
            {
                "channel": "branch",
                "staff_id": staff,
                "branch_id": branch,
                "max_offers": config.max_offers,
            },
        )
        self.visits += 1
        if customer not in self.first_contacts and not answer["cold_start"]:
            self.first_contacts[customer] = (day, not answer["control"])
        offers = answer["offers"]
        self.with_offers += bool(offers)
        accepted, best = False, 0.0
        for offer in offers:
            outcome, chance = live.answer(customer, offer["product_code"])
            accepted |= outcome == "accepted"
            best = max(best, chance)
            self.api.post(
                f"/v1/offers/{offer['offer_id']}/outcome", {"outcome": outcome, "staff_id": staff}
            )
        if rng.random() < config.feedback_share:
            score = live.feedback(
                config.feedback, offered=bool(offers), accepted=accepted, best=best
            )
            self.api.post(
                "/v1/feedback",
                {
                    "kind": "nps",
                    "score": score,
                    "decision_id": answer["decision_id"],
                    "customer_id": customer,
                    "staff_id": staff,
                    "branch_id": branch,
                },
            )


def _retrain(
    engine: Engine, config: SimulationConfig, work_dir: Path, as_of: dt.date
) -> Retraining:
    outcome = train_and_register(
        engine,
        artifacts_dir=work_dir / "models",
        as_of=as_of,
        horizon_days=config.horizon_days,
        tolerance=config.promotion_tolerance,
        config=config.train_config,
    )
    value = outcome.holdout.summary_metrics().get("map@3")
    return Retraining(
        day=as_of,
        version=outcome.version.version,
        activated=outcome.activated,
        reason=outcome.reason,
        holdout_map3=None if value is None else float(value),
    )


def _retrain_live(
    engine: Engine, config: SimulationConfig, work_dir: Path, day: dt.date, api: _Api
) -> Retraining:
    """Retrain on everything up to the end of ``day``; a version the gate promotes is
    activated through the API, so the running service loads it and swaps it in."""
    done = _retrain(engine, config, work_dir, day + dt.timedelta(days=1))
    if done.activated:
        api.post(f"/v1/models/{done.version}/activate", {})
    return done


def true_uplift(
    live: LiveBank,
    bank: SyntheticBank,
    first_contacts: dict[str, tuple[dt.date, bool]],
    config: SimulationConfig,
) -> reports.UpliftReport:
    """The uplift report with each treated customer's twin as their control.

    Every treated customer appears twice: as treated, with their adoptions; and as
    control, with their counterfactual twin's (the history, then the adoptions the
    same random draws gave a customer never offered anything). The report's own
    definitions (:func:`service.reports.measures.uplift_table`) then give the true effect of the
    offers on the treated customers, per product and for any product.
    """
    treated = [(c, d) for c, (d, is_treated) in first_contacts.items() if is_treated]
    codes = live.product_codes
    n = len(live.customer_ids)
    contacts = pd.DataFrame(
        {
            "customer_id": [live.position(c) for c, _ in treated]
            + [live.position(c) + n for c, _ in treated],
            "treated": [True] * len(treated) + [False] * len(treated),
            "day": pd.to_datetime([d for _, d in treated] * 2),
        }
    )
    history = bank.adoptions
    positions = history["customer_id"].astype(str).map(live.position).to_numpy()
    products = history["product_code"].astype(str).map({c: i for i, c in enumerate(codes)})
    history_frame = pd.DataFrame(
        {
            "customer_id": positions,
            "product_id": products.to_numpy(),
            "adopted_at": [d.date() for d in history["adopted_at"]],
            "closed_at": [None if pd.isna(d) else d.date() for d in history["closed_at"]],
        }
    )

    def world(events: list[tuple[int, int, int]], offset: int) -> pd.DataFrame:
        since = history_frame.assign(customer_id=history_frame["customer_id"] + offset)
        days = [dt.date(1970, 1, 1) + dt.timedelta(days=d) for _, _, d in events]
        later = pd.DataFrame(
            {
                "customer_id": [c + offset for c, _, _ in events],
                "product_id": [k for _, k, _ in events],
                "adopted_at": days,
                "closed_at": [None] * len(events),
            }
        )
        return pd.concat([since, later], ignore_index=True)

    actual = world([(c, k, d) for c, k, d, _ in live.adoptions], 0)
    twin = world(live.twin_adoptions, n)
    catalogue = pd.DataFrame(
        {
            "id": np.arange(len(codes)),
            "code": list(codes),
            "value": bank.products.set_index("product_code").loc[list(codes), "value"].to_numpy(),
            "active": bank.products.set_index("product_code").loc[list(codes), "active"].to_numpy(),
        }
    )
    rows, total = reports.uplift_table(
        contacts,
        pd.concat([actual, twin], ignore_index=True),
        catalogue,
        window_days=config.uplift_window_days,
        confidence=0.95,
    )
    return reports.UpliftReport(
        period=config.period,
        window_days=config.uplift_window_days,
        confidence=0.95,
        rows=rows,
        total=total,
    )
