"""Studies: one question asked of one base model, as a product (`adt-ft study`).

    spec        a study file (YAML) → a validated StudySpec: base, data, budget, arms, seeds, control, eval
    jobs        the jobs (base, fine-tuning runs, evaluations, bench) and when each is done
    claims      claiming jobs on a shared workspace: exclusive files, heartbeats, takeover of dead workers' jobs
    execute     running one job (resumable); base_rounds: a PGD-AT base trained in rounds
    worker      the worker loop, publishing the report folder, the status table
    tables      the write-up from entries alone; document (Markdown, HTML), plot (forest plot),
                masking (the gradient-masking check), stats (Holm)
"""
from .claims import Claims, worker_id
from .execute import JobRunner
from .jobs import Job, Progress, plan
from .tables import write_report
from .worker import WorkerResult, publish, run_worker, status_rows
from .spec import StudySpec, load_study

__all__ = ["Claims", "Job", "JobRunner", "Progress", "StudySpec", "WorkerResult", "load_study", "plan", "publish",
           "run_worker", "status_rows", "worker_id", "write_report"]
