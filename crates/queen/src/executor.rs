//! The queen's half of the job protocol: `infer` is scheduled on a worker, every other
//! operation is forwarded to a hive.

use std::sync::Arc;

use job_server::{ApiError, JobContext, JobExecutor, JobResult};
use rbee_contract::Operation;

use crate::forward::{self, Forward};
use crate::infer::{self, ValidInfer};
use crate::state::Queen;

pub(crate) struct QueenExecutor {
    queen: Arc<Queen>,
}

impl QueenExecutor {
    pub fn new(queen: Arc<Queen>) -> Self {
        QueenExecutor { queen }
    }
}

pub(crate) enum QueenJob {
    Infer(ValidInfer),
    Forward(Forward),
}

impl JobExecutor for QueenExecutor {
    type Job = QueenJob;

    fn admit(&self, operation: Operation) -> Result<QueenJob, ApiError> {
        match operation {
            Operation::Infer(request) => ValidInfer::parse(request).map(QueenJob::Infer),
            other => forward::admit(&self.queen, other).map(QueenJob::Forward),
        }
    }

    async fn run(&self, job: QueenJob, ctx: JobContext) -> JobResult {
        match job {
            QueenJob::Infer(job) => infer::run(&self.queen, job, &ctx).await,
            QueenJob::Forward(job) => forward::run(&self.queen, job, &ctx).await,
        }
    }
}
