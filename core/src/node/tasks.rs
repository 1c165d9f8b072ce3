//! The master's book of tasks not yet acknowledged by their client.
//!
//! # Rules (docs/architecture.md, "A participant has a durable task")
//!
//! - A task is **durable before it is sent**: `create` asks for its record to be written (the shell
//!   writes whatever must go with it in the same atomic group: its flow record, a hunt participant);
//!   only a write that is done — or maybe done — makes it pending and sends it. A refused write
//!   leaves nothing: the caller hears `Created{outcome: Refused}` and reverts what it had decided.
//! - **At most `per_client_max` tasks wait for one client**, counting those being written and those
//!   whose record is being deleted; `create` beyond it fails at once, so nothing is decided for a
//!   task that will not exist.
//! - A pending task is **sent again every `resend_ms`** (and, by the shell, whenever the client
//!   connects: [`TaskBook::pending`]) until the
//!   client acknowledges it: a push or a broadcast can be lost with a stream that died silently, and
//!   the agent acknowledges a duplicate and runs each flow once.
//! - **Acknowledged, it is sent no more** and its record is deleted; a delete that does not certainly
//!   happen is tried again at the next resend (the task keeps its slot until then: a record left on
//!   storage would be delivered again after a restart).

use super::{Outcome, Token};
use crate::time::Monotonic;
use crate::{ClientId, FlowId};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

/// Bounds and timing of the task book.
#[derive(Clone, Debug)]
pub struct TaskLimits {
    /// Tasks waiting for one client (`Frontend.resources.max_queued_tasks_per_client`).
    pub per_client_max: usize,
    /// How often pending tasks are sent again.
    pub resend_ms: u64,
}

/// Why a task was not created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// `max` tasks already wait for the client.
    Full {
        /// The client.
        client: ClientId,
        /// The bound.
        max: usize,
    },
    /// The client has a task for this flow already.
    Duplicate {
        /// The flow.
        flow: FlowId,
    },
    /// A hunt's task, and the hunt is not known (hunts are never removed: a bug if seen).
    UnknownHunt {
        /// The hunt.
        hunt: crate::HuntId,
    },
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Full { client, max } => write!(
                f,
                "{max} tasks already wait for {client} (max_queued_tasks_per_client)"
            ),
            TaskError::Duplicate { flow } => write!(f, "flow {flow} is tasked already"),
            TaskError::UnknownHunt { hunt } => write!(f, "no hunt {hunt}"),
        }
    }
}

impl std::error::Error for TaskError {}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskAction<T, C> {
    /// Write the task's record (atomically with what goes with it), then call
    /// [`TaskBook::handle_written`] with the token.
    Write {
        /// Names the write.
        token: Token,
        /// The client.
        client: ClientId,
        /// The task's flow.
        flow: FlowId,
        /// The task.
        task: T,
    },
    /// The creation asked for with `token` ended. `Done` and `Unknown` (maybe written) leave the
    /// task pending and being delivered; `Refused` leaves nothing.
    Created {
        /// Names the creation.
        token: Token,
        /// The client.
        client: ClientId,
        /// The task's flow.
        flow: FlowId,
        /// How its write ended.
        outcome: Outcome,
        /// What the caller gave `create`.
        context: C,
    },
    /// Send the task toward its client, wherever that is connected.
    Deliver {
        /// The client.
        client: ClientId,
        /// The task.
        task: T,
    },
    /// Delete the task's record, then call [`TaskBook::handle_deleted`].
    Delete {
        /// The client.
        client: ClientId,
        /// The task's flow.
        flow: FlowId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Its record is being written.
    Writing(Token),
    /// Durable (or maybe): sent until acknowledged.
    Pending,
    /// Acknowledged; its record is being deleted (`in_flight`) or will be again at the next resend.
    Deleting { in_flight: bool },
}

#[derive(Debug)]
struct Entry<T> {
    flow: FlowId,
    task: T,
    state: State,
}

/// The master's tasks not yet acknowledged, per client, in creation order.
#[derive(Debug)]
pub struct TaskBook<T, C> {
    limits: TaskLimits,
    clients: BTreeMap<ClientId, Vec<Entry<T>>>,
    /// Creations in flight: their caller's context.
    writing: BTreeMap<Token, (ClientId, FlowId, C)>,
    next_token: u64,
    resend_at: Monotonic,
    actions: VecDeque<TaskAction<T, C>>,
}

impl<T: Clone, C> TaskBook<T, C> {
    /// The book after a restart: the tasks whose records are on storage, pending.
    pub fn restore(
        limits: TaskLimits,
        now: Monotonic,
        tasks: impl IntoIterator<Item = (ClientId, FlowId, T)>,
    ) -> TaskBook<T, C> {
        let mut clients: BTreeMap<ClientId, Vec<Entry<T>>> = BTreeMap::new();
        for (client, flow, task) in tasks {
            clients.entry(client).or_default().push(Entry {
                flow,
                task,
                state: State::Pending,
            });
        }
        TaskBook {
            resend_at: now.plus_ms(limits.resend_ms),
            limits,
            clients,
            writing: BTreeMap::new(),
            next_token: 1,
            actions: VecDeque::new(),
        }
    }

    /// Tasks waiting for `client` (being written, pending, or being deleted).
    pub fn waiting(&self, client: &ClientId) -> usize {
        self.clients.get(client).map_or(0, Vec::len)
    }

    /// Whether the flow's task record is being written (not yet pending).
    pub fn is_writing(&self, client: &ClientId, flow: &FlowId) -> bool {
        self.clients.get(client).is_some_and(|es| {
            es.iter()
                .any(|e| &e.flow == flow && matches!(e.state, State::Writing(_)))
        })
    }

    /// Whether the client has a task for this flow (being written, pending, or being deleted).
    pub fn contains(&self, client: &ClientId, flow: &FlowId) -> bool {
        self.clients
            .get(client)
            .is_some_and(|es| es.iter().any(|e| &e.flow == flow))
    }

    /// Clients with a task waiting.
    pub fn clients(&self) -> impl Iterator<Item = &ClientId> {
        self.clients.keys()
    }

    /// The pending tasks of a client (durable, not yet acknowledged), in creation order: what goes
    /// toward it when it connects (again), wherever that is.
    pub fn pending(&self, client: &ClientId) -> impl Iterator<Item = (&FlowId, &T)> {
        self.clients
            .get(client)
            .into_iter()
            .flatten()
            .filter(|e| e.state == State::Pending)
            .map(|e| (&e.flow, &e.task))
    }

    /// Asks for a new task: its record is written first (`Write`), and `Created` reports how that
    /// ended. Fails at once, deciding nothing, if the client is at its bound or has this flow.
    pub fn create(
        &mut self,
        client: ClientId,
        flow: FlowId,
        task: T,
        context: C,
    ) -> Result<Token, TaskError> {
        let entries = self.clients.entry(client.clone()).or_default();
        if entries.iter().any(|e| e.flow == flow) {
            return Err(TaskError::Duplicate { flow });
        }
        if entries.len() >= self.limits.per_client_max {
            if entries.is_empty() {
                self.clients.remove(&client);
            }
            return Err(TaskError::Full {
                client,
                max: self.limits.per_client_max,
            });
        }
        let token = Token(self.next_token);
        self.next_token += 1;
        entries.push(Entry {
            flow: flow.clone(),
            task: task.clone(),
            state: State::Writing(token),
        });
        self.writing
            .insert(token, (client.clone(), flow.clone(), context));
        self.actions.push_back(TaskAction::Write {
            token,
            client,
            flow,
            task,
        });
        Ok(token)
    }

    /// How the write of a task's record ended.
    pub fn handle_written(&mut self, token: Token, outcome: Outcome) {
        let Some((client, flow, context)) = self.writing.remove(&token) else {
            return;
        };
        let Some(entries) = self.clients.get_mut(&client) else {
            return;
        };
        let Some(i) = entries
            .iter()
            .position(|e| e.state == State::Writing(token))
        else {
            return;
        };
        let task = if outcome == Outcome::Refused {
            entries.remove(i);
            if entries.is_empty() {
                self.clients.remove(&client);
            }
            None
        } else {
            // Maybe written is treated as written: delivering a task whose record is missing is
            // harmless (its completion finds no record and is acknowledged), losing one is not.
            entries[i].state = State::Pending;
            Some(entries[i].task.clone())
        };
        self.actions.push_back(TaskAction::Created {
            token,
            client: client.clone(),
            flow,
            outcome,
            context,
        });
        if let Some(task) = task {
            self.actions.push_back(TaskAction::Deliver { client, task });
        }
    }

    /// The client acknowledged the flow's task (or completed the flow, which implies it). True if
    /// it was pending: it is sent no more, and its record is deleted.
    pub fn handle_acked(&mut self, client: &ClientId, flow: &FlowId) -> bool {
        let Some(e) = self
            .clients
            .get_mut(client)
            .and_then(|es| es.iter_mut().find(|e| &e.flow == flow))
        else {
            return false;
        };
        if e.state != State::Pending {
            return false; // A duplicate acknowledgement, or one racing its own write.
        }
        e.state = State::Deleting { in_flight: true };
        self.actions.push_back(TaskAction::Delete {
            client: client.clone(),
            flow: flow.clone(),
        });
        true
    }

    /// How the delete of an acknowledged task's record ended. Not certainly done, it is tried
    /// again at the next resend.
    pub fn handle_deleted(&mut self, client: &ClientId, flow: &FlowId, outcome: Outcome) {
        let Some(es) = self.clients.get_mut(client) else {
            return;
        };
        let Some(i) = es.iter().position(|e| &e.flow == flow) else {
            return;
        };
        if es[i].state != (State::Deleting { in_flight: true }) {
            return;
        }
        if outcome == Outcome::Done {
            es.remove(i);
            if es.is_empty() {
                self.clients.remove(client);
            }
        } else {
            es[i].state = State::Deleting { in_flight: false };
        }
    }

    /// Sends every pending task again, and retries deletes that failed, once `resend_ms` passed.
    pub fn handle_timeout(&mut self, now: Monotonic) {
        if now < self.resend_at {
            return;
        }
        self.resend_at = now.plus_ms(self.limits.resend_ms);
        for (client, es) in &mut self.clients {
            for e in es {
                match e.state {
                    State::Pending => self.actions.push_back(TaskAction::Deliver {
                        client: client.clone(),
                        task: e.task.clone(),
                    }),
                    State::Deleting { in_flight: false } => {
                        e.state = State::Deleting { in_flight: true };
                        self.actions.push_back(TaskAction::Delete {
                            client: client.clone(),
                            flow: e.flow.clone(),
                        });
                    }
                    State::Writing(_) | State::Deleting { in_flight: true } => {}
                }
            }
        }
    }

    /// When to call `handle_timeout` next (nothing waits: none).
    pub fn poll_timeout(&self) -> Option<Monotonic> {
        (!self.clients.is_empty()).then_some(self.resend_at)
    }

    /// The next action. An input queues at most one `Write`, `Created` + `Deliver`, or `Delete`;
    /// `handle_timeout` one per task waiting (bounded by the book).
    pub fn poll_action(&mut self) -> Option<TaskAction<T, C>> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests;
