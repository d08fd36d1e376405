//! A process's long-running tasks, each named: what every service's `start` adds to, and what
//! `App` runs until shutdown (reporting which task ended, and why).

use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::config::{ConsumerSettings, Redeliver};
use crate::saga::{apply, Step};

/// A finished task: its name and how it ended.
pub type TaskResult = (String, Result<(), TaskError>);

/// Why a long-running task ended with an error (its cause kept as the source).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("serving HTTP")]
    Serve(#[from] std::io::Error),
    #[error("consuming")]
    Consume(#[from] BusError),
    #[error("the task panicked or was cancelled")]
    Join(#[from] tokio::task::JoinError),
}

/// What the saga steps of a process consume with: the bus, how to pull and retry, and how
/// long a prepared step's commit waits for company (`database.group_linger`).
#[derive(Clone)]
pub struct Consuming {
    pub bus: Bus,
    pub settings: ConsumerSettings,
    pub chaos: Redeliver,
    pub group_linger: std::time::Duration,
}

/// The tasks of one process, sharing one shutdown signal.
pub struct Tasks {
    set: JoinSet<TaskResult>,
    shutdown: CancellationToken,
}

impl Tasks {
    /// No tasks yet; `shutdown` stops them all.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            shutdown,
        }
    }

    /// The shutdown signal every task follows.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs a task that may fail (a server, a consumer).
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        self.set.spawn(async move { (name.to_owned(), task.await) });
    }

    /// Runs a background loop that ends at shutdown; it is handed the shutdown signal.
    pub fn until_shutdown<F>(
        &mut self,
        name: &'static str,
        task: impl FnOnce(CancellationToken) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let work = task(self.shutdown.clone());
        self.spawn(name, async move {
            work.await;
            Ok(())
        });
    }

    /// Runs a step's consumer until shutdown, named for its durable.
    pub fn step<S: Step>(&mut self, consuming: &Consuming, step: S) {
        let Consuming {
            bus,
            settings,
            chaos,
            group_linger,
        } = consuming.clone();
        let token = self.shutdown.clone();
        self.spawn(S::DURABLE, async move {
            apply::run(Arc::new(step), bus, settings, chaos, group_linger, token)
                .await
                .map_err(TaskError::from)
        });
    }

    /// Waits for the next task to end.
    pub async fn join_next(&mut self) -> Option<Result<TaskResult, tokio::task::JoinError>> {
        self.set.join_next().await
    }
}
