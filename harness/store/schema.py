"""The results store's tables: SQLAlchemy 2 typed models (long format, fractions in [0, 1]).

- ``jobs``: one row per job, keyed by the sha256 of its identity (everything that can
  change its number). Status, resolved configuration, gradient path, EOT samples,
  evaluation draws, NFE counts, timings and environment.
- ``batches``: per-batch progress of a job (written as each batch finishes, so an
  interrupted job resumes mid-way) with that batch's convergence-curve counts.
- ``examples``: one row per evaluated example: label, clean and adversarial
  predictions for every evaluation draw and attack, perturbation norms, outcome flags.
- ``metrics``: named metrics with 95% Wilson intervals and the number of examples.
- ``curves``: robust accuracy after every attack iteration (the convergence curve).
- ``samples``: a few clean / adversarial / purified images per job for the dashboard.
- ``adv_cache``: preprocessor-blind adversarial examples, shared by every defense.
- ``meta``: the schema version.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1

class Base(DeclarativeBase):
    """The declarative base of the store's tables."""


class Job(Base):
    """One job (a defense x threat x dataset x classifier x seed evaluation), keyed by its identity hash:
    status, resolved configuration, NFE counts, timings and environment.
    """

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    defense: Mapped[str] = mapped_column(String(128), index=True)
    threat: Mapped[str] = mapped_column(String(128), index=True)
    dataset: Mapped[str] = mapped_column(String(64), index=True)
    classifier: Mapped[str] = mapped_column(String(128), index=True)
    seed: Mapped[int] = mapped_column(Integer)
    n_examples: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)  # running | done | failed | skipped
    norm: Mapped[str | None] = mapped_column(String(8), nullable=True)
    eps: Mapped[float | None] = mapped_column(Float, nullable=True)
    gradient_path: Mapped[str | None] = mapped_column(String(32), nullable=True)
    eot_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    eval_draws: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stochastic: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    adaptive: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    identity: Mapped[dict] = mapped_column(JSON)
    config: Mapped[dict] = mapped_column(JSON)
    environment: Mapped[dict] = mapped_column(JSON, default=dict)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    nfe: Mapped[dict] = mapped_column(JSON, default=dict)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # failure / skip reason
    # flags on weak numbers (harness.evaluation.flags): a JSON list of {"flag": NAME, "detail": TEXT},
    # [] when nothing is flagged, NULL for a job finished before flags existed (harness.store.migrate adds the column)
    flags: Mapped[list | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BatchRow(Base):
    """One finished batch of a job: its example count, convergence-curve counts, NFEs and seconds."""

    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("job_id", "batch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    batch: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    curves: Mapped[dict] = mapped_column(JSON)  # attack -> list of robust counts per iteration
    nfe: Mapped[dict] = mapped_column(JSON)
    seconds: Mapped[float] = mapped_column(Float)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)  # e.g. detection scores


class ExampleRow(Base):
    """One evaluated example of a job: label, predictions per draw and attack, perturbation norms, outcome flags."""

    __tablename__ = "examples"
    __table_args__ = (UniqueConstraint("job_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # index within the evaluation subset
    dataset_index: Mapped[int] = mapped_column(Integer)  # index within the dataset split
    batch: Mapped[int] = mapped_column(Integer)
    label: Mapped[int] = mapped_column(Integer)
    clean_preds: Mapped[list] = mapped_column(JSON)  # R predictions on the clean input
    adv_preds: Mapped[dict] = mapped_column(JSON)  # attack -> R predictions on its adversarial input
    worst_attack: Mapped[str | None] = mapped_column(String(32), nullable=True)
    linf: Mapped[float] = mapped_column(Float)
    l2: Mapped[float] = mapped_column(Float)
    clean_single: Mapped[bool] = mapped_column(Boolean)
    clean_majority: Mapped[bool] = mapped_column(Boolean)
    clean_worst: Mapped[bool] = mapped_column(Boolean)
    robust_single: Mapped[bool] = mapped_column(Boolean)
    robust_majority: Mapped[bool] = mapped_column(Boolean)
    robust_worst: Mapped[bool] = mapped_column(Boolean)
    detect_clean: Mapped[float | None] = mapped_column(Float, nullable=True)
    detect_adv: Mapped[float | None] = mapped_column(Float, nullable=True)
    # image quality of one purification vs the clean image, of the clean and of the adversarial input
    psnr_clean: Mapped[float | None] = mapped_column(Float, nullable=True)
    ssim_clean: Mapped[float | None] = mapped_column(Float, nullable=True)
    psnr_adv: Mapped[float | None] = mapped_column(Float, nullable=True)
    ssim_adv: Mapped[float | None] = mapped_column(Float, nullable=True)
    # paired_reference: the reference outcomes on the same example (harness.evaluation.batch.paired_reference);
    # added after stores existed: harness.store.migrate adds the column to an older store
    reference: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class MetricRow(Base):
    """One named metric of a job, with its 95% Wilson interval and number of examples."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    lower: Mapped[float | None] = mapped_column(Float, nullable=True)
    upper: Mapped[float | None] = mapped_column(Float, nullable=True)
    n: Mapped[int | None] = mapped_column(Integer, nullable=True)


class CurveRow(Base):
    """One point of a job's convergence curve: robust accuracy after one iteration of one attack."""

    __tablename__ = "curves"
    __table_args__ = (UniqueConstraint("job_id", "attack", "iteration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attack: Mapped[str] = mapped_column(String(32))
    iteration: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)


class SampleRow(Base):
    """The clean, adversarial and purified images of one example of a job (npz, uint8 CHW), for the dashboard."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("job_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    images: Mapped[bytes] = mapped_column(LargeBinary)  # npz: clean, adversarial, purified (uint8 CHW)


class AdvCacheRow(Base):
    """Adversarial examples that do not depend on the defense (classifier-only attacks),
    keyed by their own identity, so every defense in a grid reuses them.
    """

    __tablename__ = "adv_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MetaRow(Base):
    """One key-value setting of the store (the schema version)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
