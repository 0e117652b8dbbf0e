"""A closed-loop simulation of nbo on the synthetic bank: the demonstration before going live.

:func:`run_simulation` generates a synthetic bank (:mod:`models.synthetic`), imports it
into a fresh database, trains and activates a model, and then lives through
``days`` days. Every day a sample of customers visits their branch; each visit asks the
real decision API (in-process: :func:`service.app.create_app` started through the ASGI
lifespan protocol as a server starts it, and called through ``httpx.ASGITransport``,
with the serving clock set to the simulated day) for offers; the customer answers every offer by the ground truth
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

Every day is also read as an analyst watching the experiment would read it that
evening (:class:`SimulatedDay`): the customers contacted so far and their adoptions so
far, measured and true, with the same definitions; the last day's reading is the final
report's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.types import ASGIApp, Message

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
class SimulatedDay:
    """One simulated day: what happened, and the experiment as read that evening.

    Attributes
    ----------
    day : datetime.date
    decisions, control_decisions, decisions_with_offers : int
        Decisions asked for (one per branch visit), those that fell to the control
        group (no offers), and those that returned offers.
    offers, accepted, declined, not_now : int
        Offers made that day and the customers' answers to them.
    promoters, passives, detractors : int
        NPS answers given that day (9-10, 7-8, 0-6).
    uplift : service.reports.measures.UpliftRow
        Adoption of any product, treated versus control, among the customers first
        contacted up to this day, counting their adoptions up to this day (the uplift
        window cut at the day).
    true_uplift : service.reports.measures.UpliftRow
        The same with the treated customers' counterfactual twins as the control: its
        ``difference`` is the true effect so far.
    """

    day: dt.date
    decisions: int
    control_decisions: int
    decisions_with_offers: int
    offers: int
    accepted: int
    declined: int
    not_now: int
    promoters: int
    passives: int
    detractors: int
    uplift: reports.UpliftRow
    true_uplift: reports.UpliftRow

    @property
    def nps_responses(self) -> int:
        """NPS answers given that day."""
        return self.promoters + self.passives + self.detractors

    @property
    def nps(self) -> float | None:
        """That day's net promoter score (None without answers)."""
        n = self.nps_responses
        return None if n == 0 else 100.0 * (self.promoters - self.detractors) / n


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
    daily : list of SimulatedDay
        Every simulated day, oldest first.
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
    daily: list[SimulatedDay]
    seconds: float

    @property
    def control_decisions(self) -> int:
        """Decisions that fell to the control group."""
        return sum(day.control_decisions for day in self.daily)

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


@asynccontextmanager
async def _serving(app: ASGIApp) -> AsyncIterator[None]:
    """Run ``app``'s lifespan as a server does (the ASGI lifespan protocol): start-up
    before the body, shutdown after it, so the app's middleware sees it too.

    Raises
    ------
    RuntimeError
        When the app reports that its start-up or shutdown failed (the app's own
        exception, when it raised one, propagates instead).
    """
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    async def send(message: Message) -> None:
        await from_app.put(message)

    async def run() -> None:
        await app(scope, to_app.get, send)

    task: asyncio.Task[None] = asyncio.create_task(run())

    async def phase(name: str) -> None:
        await to_app.put({"type": f"lifespan.{name}"})
        answer = asyncio.create_task(from_app.get())
        await asyncio.wait({answer, task}, return_when=asyncio.FIRST_COMPLETED)
        if answer.done() and answer.result()["type"] == f"lifespan.{name}.complete":
            return
        answer.cancel()
        message = answer.result().get("message", "") if answer.done() else ""
        await task  # the app's own exception, if it raised one
        raise RuntimeError(f"the service's {name} failed: {message or 'no reason given'}")

    try:
        await phase("startup")
    except BaseException:
        task.cancel()
        raise
    try:
        yield
    finally:
        await phase("shutdown")
        await task


class _Api:
    """The service in-process, driven as a bank's systems would, on a simulated clock."""

    def __init__(self, client: httpx.AsyncClient, app: FastAPI, key: str) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {key}"}
        self.now = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        app.state.serving.clock = lambda: self.now

    async def post(self, url: str, body: dict[str, Any]) -> Any:
        response = await self.client.post(url, json=body, headers=self.headers)
        if response.status_code >= 400:
            raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text}")
        return response.json()


def run_simulation(
    config: SimulationConfig, work_dir: Path, *, progress: ProgressFn | None = None
) -> SimulationResult:
    """Run the closed loop (see the module docstring) in ``work_dir``.

    Runs its own event loop, so it must not be called from a running one.

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
        loop = _Loop(config, live, rng, bank)
        later = asyncio.run(_live_days(loop, create_app(settings), key, engine, work_dir, report))
        report("measuring", config.days, config.days)
        period = config.period
        conversion = reports.conversion(
            engine, period, by="product", adoption_window_days=config.uplift_window_days
        )
        uplift = reports.uplift(engine, period, window_days=config.uplift_window_days)
        nps = reports.nps(engine, period, by="branch")
    finally:
        engine.dispose()
    experiment = _Experiment(live, bank, loop.first_contacts, config)
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
        true_uplift=experiment.true_report(),
        retrainings=[first, *later],
        daily=[
            SimulatedDay(
                day=day,
                decisions=tally["decisions"],
                control_decisions=tally["control"],
                decisions_with_offers=tally["with_offers"],
                offers=tally["offers"],
                accepted=tally["accepted"],
                declined=tally["declined"],
                not_now=tally["not_now"],
                promoters=tally["promoters"],
                passives=tally["passives"],
                detractors=tally["detractors"],
                uplift=experiment.measured_total(day),
                true_uplift=experiment.true_total(day),
            )
            for day, tally in ((day, loop.tallies[day]) for day in config.period.days)
        ],
        seconds=time.perf_counter() - started,
    )


async def _live_days(
    loop: _Loop, app: FastAPI, key: str, engine: Engine, work_dir: Path, report: ProgressFn
) -> list[Retraining]:
    """Serve the simulated days through ``app``; the retrainings made on the way."""
    config = loop.config
    retrainings = []
    async with (
        _serving(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://nbo.simulation"
        ) as client,
    ):
        api = _Api(client, app, key)
        for i, day in enumerate(config.period.days):
            report(f"day {day}", i, config.days)
            await loop.live_day(day, api)
            every = config.retrain_every_days
            if every and (i + 1) % every == 0 and i + 1 < config.days:
                report(f"day {day}: retraining", i + 1, config.days)
                retrainings.append(await _retrain_live(engine, config, work_dir, day, api))
    return retrainings


class _Loop:
    """The simulated days: visits, answers, feedback, adoptions."""

    def __init__(
        self,
        config: SimulationConfig,
        live: LiveBank,
        rng: np.random.Generator,
        bank: SyntheticBank,
    ) -> None:
        self.config = config
        self.live = live
        self.rng = rng
        self.branches = bank.customers["branch_id"].astype(str).to_numpy(dtype=object)
        self.first_contacts: dict[str, tuple[dt.date, bool]] = {}
        self.visits = 0
        self.with_offers = 0
        self.tallies: dict[dt.date, Counter[str]] = {}
        """Per day: decisions, control, with_offers, offers, the answers by outcome,
        and NPS answers as promoters, passives, detractors."""

    async def live_day(self, day: dt.date, api: _Api) -> None:
        config, live, rng = self.config, self.live, self.rng
        tally = self.tallies.setdefault(day, Counter())
        chance = config.visits_per_month / 30.4375
        visitors = np.flatnonzero(rng.random(len(live.customer_ids)) < chance)
        rng.shuffle(visitors)
        opening = dt.datetime.combine(day, dt.time(9), tzinfo=dt.UTC)
        step = dt.timedelta(seconds=max(1, (9 * 3600) // max(len(visitors), 1)))
        for k, position in enumerate(visitors):
            api.now = opening + k * step
            customer, branch = str(live.customer_ids[position]), str(self.branches[position])
            await self.visit(customer, branch, day, api, tally)
        api.now = dt.datetime.combine(day, dt.time(20), tzinfo=dt.UTC)
        adopted = live.end_day()
        for chunk in range(0, len(adopted), 1000):
            rows = adopted[chunk : chunk + 1000]
            await api.post(
                "/v1/adoptions",
                {
                    "adoptions": [
                        {"customer_id": c, "product_code": p, "adopted_at": day.isoformat()}
                        for c, p in rows
                    ]
                },
            )

    async def visit(
        self, customer: str, branch: str, day: dt.date, api: _Api, tally: Counter[str]
    ) -> None:
        config, live, rng = self.config, self.live, self.rng
        staff = f"{branch}-S{int(rng.integers(1, config.staff_per_branch + 1))}"
        answer = await api.post(
            f"/v1/customers/{customer}/decisions",
            {
                "channel": "branch",
                "staff_id": staff,
                "branch_id": branch,
                "max_offers": config.max_offers,
            },
        )
        self.visits += 1
        tally["decisions"] += 1
        tally["control"] += bool(answer["control"])
        if customer not in self.first_contacts and not answer["cold_start"]:
            self.first_contacts[customer] = (day, not answer["control"])
        offers = answer["offers"]
        self.with_offers += bool(offers)
        tally["with_offers"] += bool(offers)
        accepted, best = False, 0.0
        for offer in offers:
            outcome, chance = live.answer(customer, offer["product_code"])
            accepted |= outcome == "accepted"
            best = max(best, chance)
            tally["offers"] += 1
            tally[outcome] += 1
            await api.post(
                f"/v1/offers/{offer['offer_id']}/outcome", {"outcome": outcome, "staff_id": staff}
            )
        if rng.random() < config.feedback_share:
            score = live.feedback(
                config.feedback, offered=bool(offers), accepted=accepted, best=best
            )
            tally["promoters" if score >= 9 else "passives" if score >= 7 else "detractors"] += 1
            await api.post(
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


async def _retrain_live(
    engine: Engine, config: SimulationConfig, work_dir: Path, day: dt.date, api: _Api
) -> Retraining:
    """Retrain on everything up to the end of ``day``; a version the gate promotes is
    activated through the API, so the running service loads it and swaps it in.

    Training runs in a worker thread: the service's event loop stays free meanwhile,
    as it would be in production."""
    done = await asyncio.to_thread(_retrain, engine, config, work_dir, day + dt.timedelta(days=1))
    if done.activated:
        await api.post(f"/v1/models/{done.version}/activate", {})
    return done


class _Experiment:
    """The experiment as plain frames, measured and true, read as of any day.

    Every contacted customer appears with their arm and first contact day, and with
    their adoptions (the history, then the live ones). For the truth, every treated
    customer appears a second time as control, with their counterfactual twin's
    adoptions (the history, then the adoptions the same random draws gave a customer
    never offered anything). The report's own definitions
    (:func:`service.reports.measures.uplift_table`) then give the measured uplift
    (treated versus control group) and the true one (treated versus their twins).
    """

    def __init__(
        self,
        live: LiveBank,
        bank: SyntheticBank,
        first_contacts: dict[str, tuple[dt.date, bool]],
        config: SimulationConfig,
    ) -> None:
        self.config = config
        n = len(live.customer_ids)
        contacted = [(live.position(c), d, treated) for c, (d, treated) in first_contacts.items()]
        self.contacts = pd.DataFrame(
            {
                "customer_id": pd.Series([c for c, _, _ in contacted], dtype="int64"),
                "treated": pd.Series([t for _, _, t in contacted], dtype=bool),
                "day": pd.to_datetime(pd.Series([d for _, d, _ in contacted], dtype=object)),
            }
        )
        treated = self.contacts[self.contacts["treated"]]
        self.twins = pd.concat(
            [treated, treated.assign(customer_id=treated["customer_id"] + n, treated=False)],
            ignore_index=True,
        )
        codes = live.product_codes
        # Only the contacted customers' history matters; the rest would only slow each read.
        history = bank.adoptions[
            bank.adoptions["customer_id"]
            .astype(str)
            .map(live.position)
            .isin(set(self.contacts["customer_id"]))
        ]
        history_frame = pd.DataFrame(
            {
                "customer_id": history["customer_id"].astype(str).map(live.position).to_numpy(),
                "product_id": history["product_code"]
                .astype(str)
                .map({c: i for i, c in enumerate(codes)})
                .to_numpy(),
                "adopted_at": [d.date() for d in history["adopted_at"]],
                "closed_at": [None if pd.isna(d) else d.date() for d in history["closed_at"]],
            }
        )

        def world(events: list[tuple[int, int, int]], offset: int) -> pd.DataFrame:
            since = history_frame.assign(customer_id=history_frame["customer_id"] + offset)
            later = pd.DataFrame(
                {
                    "customer_id": [c + offset for c, _, _ in events],
                    "product_id": [k for _, k, _ in events],
                    "adopted_at": [dt.date(1970, 1, 1) + dt.timedelta(days=d) for *_, d in events],
                    "closed_at": [None] * len(events),
                }
            )
            return pd.concat([since, later], ignore_index=True)

        self.actual = world([(c, k, d) for c, k, d, _ in live.adoptions], 0)
        self.both = pd.concat([self.actual, world(live.twin_adoptions, n)], ignore_index=True)
        frame = bank.products.set_index("product_code").loc[list(codes)]
        self.catalogue = pd.DataFrame(
            {
                "id": np.arange(len(codes)),
                "code": list(codes),
                "value": frame["value"].to_numpy(),
                "active": frame["active"].to_numpy(),
            }
        )

    def _table(
        self, contacts: pd.DataFrame, adoptions: pd.DataFrame, day: dt.date | None
    ) -> tuple[list[reports.UpliftRow], reports.UpliftRow]:
        if day is not None:
            contacts = contacts[contacts["day"] <= pd.Timestamp(day)]
            adoptions = adoptions[adoptions["adopted_at"] <= day]
        return reports.uplift_table(
            contacts,
            adoptions,
            self.catalogue,
            window_days=self.config.uplift_window_days,
            confidence=0.95,
        )

    def measured_total(self, day: dt.date) -> reports.UpliftRow:
        """Any product, treated versus control, as read at the end of ``day``."""
        return self._table(self.contacts, self.actual, day)[1]

    def true_total(self, day: dt.date) -> reports.UpliftRow:
        """Any product, treated versus their twins, as read at the end of ``day``."""
        return self._table(self.twins, self.both, day)[1]

    def true_report(self) -> reports.UpliftReport:
        """The true uplift of every product over the whole run."""
        rows, total = self._table(self.twins, self.both, None)
        return reports.UpliftReport(
            period=self.config.period,
            window_days=self.config.uplift_window_days,
            confidence=0.95,
            rows=rows,
            total=total,
        )
