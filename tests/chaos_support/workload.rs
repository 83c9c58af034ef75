//! The chaos workload and its model: seeded store plans of 1–10 instructions over a few thousand
//! resources, about 5% of them designed to fail, and the state the store must hold afterwards.
//!
//! Model invariant: two commands touching the same resource are never in flight together. A
//! resource is *busy* from the moment a command naming it is generated until that command's first
//! reply arrives, and the generator only picks idle resources. So every command is generated against
//! the state all earlier commands on its resources left, its outcome (applied, or refused by design)
//! is known in advance, and the expected final state does not depend on the order the bridge picks
//! for concurrent commands (it can only reorder commands on disjoint resources). A command whose reply
//! never comes leaves its resources busy and *unknown*: they are left out of the store comparison and
//! the command is counted as lost.

use std::collections::HashMap;

use fhir_pubsub::contracts::ChangeType;
use serde_json::{Value, json};
use uuid::Uuid;

/// (Type/id, version, change type): one committed change, as the version log and the events name it.
pub type ChangeKey = (String, String, ChangeType);

/// A small seeded xorshift generator: the same seed gives the same workload.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..m`.
    pub fn below(&mut self, m: u64) -> u64 {
        self.next() % m
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the model knows of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceState {
    /// Never written.
    Absent,
    /// Live at `version` with exactly `body`.
    Live { version: String, body: String },
    /// Deleted; `version` was the last live one (not reusable).
    Deleted { version: String },
    /// A command on it never got a reply: its outcome is not known.
    Unknown,
}

/// The instruction kinds the workload sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Upsert,
    Delete,
}

impl Operation {
    fn wire(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Upsert => "upsert",
            Operation::Delete => "delete",
        }
    }
}

/// One instruction of a generated plan, with what it does when the plan is applied.
#[derive(Debug, Clone)]
pub struct Step {
    pub resource: usize,
    pub item_id: String,
    /// The state the resource has when the plan is applied.
    pub after: ResourceState,
    /// The change it commits, if the plan is applied.
    pub change: ChangeKey,
}

/// A generated command and its predicted outcome.
#[derive(Debug, Clone)]
pub struct Command {
    /// The envelope's messageId (also its requestId): sending it again is the same command.
    pub id: Uuid,
    pub number: u64,
    /// The `message` object of the ExecuteStorePlanCommand.
    pub message: Value,
    pub steps: Vec<Step>,
    /// The itemId of the instruction designed to fail, if the plan is meant to fail.
    pub failing_item: Option<String>,
}

impl Command {
    pub fn expect_applied(&self) -> bool {
        self.failing_item.is_none()
    }
}

/// The model: the state of every resource, which are busy, and the commands in flight.
pub struct Model {
    pub tag: String,
    pub states: Vec<ResourceState>,
    busy: Vec<bool>,
    rng: Rng,
    next_number: u64,
    /// Generated commands whose first reply has not come yet.
    pub in_flight: HashMap<Uuid, Command>,
    /// Every generated command, by id.
    pub sent: HashMap<Uuid, Command>,
    /// The changes of every command whose reply said it was applied.
    pub expected_changes: Vec<ChangeKey>,
    /// Commands whose reply did not match the prediction (applied vs refused, or the wrong item named).
    pub wrong_outcomes: Vec<String>,
}

impl Model {
    pub fn new(tag: &str, resources: usize, seed: u64) -> Model {
        Model {
            tag: tag.to_owned(),
            states: vec![ResourceState::Absent; resources],
            busy: vec![false; resources],
            rng: Rng::new(seed),
            next_number: 0,
            in_flight: HashMap::new(),
            sent: HashMap::new(),
            expected_changes: Vec::new(),
            wrong_outcomes: Vec::new(),
        }
    }

    /// `Patient/<tag>-<n>`'s id.
    pub fn resource_id(&self, n: usize) -> String {
        format!("{}-{n}", self.tag)
    }

    /// The next command over idle resources, or `None` when too few are idle (wait for replies).
    pub fn generate(&mut self) -> Option<Command> {
        let wanted = 1 + self.rng.below(10) as usize;
        let mut picked: Vec<usize> = Vec::with_capacity(wanted);
        for _ in 0..wanted * 4 {
            if picked.len() == wanted {
                break;
            }
            let r = self.rng.below(self.states.len() as u64) as usize;
            if !self.busy[r] && !picked.contains(&r) && self.states[r] != ResourceState::Unknown {
                picked.push(r);
            }
        }
        if picked.is_empty() {
            return None;
        }
        let number = self.next_number;
        self.next_number += 1;
        let version = format!("v{number}");
        let failing = self.rng.percent(5).then(|| self.rng.below(picked.len() as u64) as usize);
        let mut instructions = Vec::new();
        let mut steps = Vec::new();
        let mut failing_item = None;
        for (i, &r) in picked.iter().enumerate() {
            let id = self.resource_id(r);
            let key = format!("Patient/{id}");
            let item_id = format!("{number}.{i}");
            let body = json!({"resourceType": "Patient", "id": id,
                "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"},
                "name": [{"family": format!("F{}", self.rng.below(1_000_000))}]})
            .to_string();
            let state = self.states[r].clone();
            let mut instruction = json!({"itemId": item_id, "resourceType": "Patient", "resourceId": id});
            let (operation, current, after, change) = if failing == Some(i) {
                failing_item = Some(item_id.clone());
                // Refused by design: a version conflict, an update of nothing, a create of a live resource.
                let (operation, current) = match &state {
                    ResourceState::Live { version: v, .. } if self.rng.percent(50) => {
                        (Operation::Update, Some(format!("{v}-stale")))
                    }
                    ResourceState::Live { .. } => (Operation::Create, None),
                    _ => (Operation::Update, None),
                };
                (operation, current, state.clone(), (key, version.clone(), ChangeType::Update))
            } else {
                let live = ResourceState::Live { version: version.clone(), body: body.clone() };
                match &state {
                    ResourceState::Live { version: v, .. } => match self.rng.below(10) {
                        0..=4 => (Operation::Update, Some(v.clone()), live, (key, version.clone(), ChangeType::Update)),
                        5..=7 => (Operation::Upsert, None, live, (key, version.clone(), ChangeType::Update)),
                        _ => (
                            Operation::Delete,
                            Some(v.clone()),
                            ResourceState::Deleted { version: v.clone() },
                            (key, v.clone(), ChangeType::Delete),
                        ),
                    },
                    _ => {
                        let operation = if self.rng.percent(60) { Operation::Create } else { Operation::Upsert };
                        (operation, None, live, (key, version.clone(), ChangeType::Create))
                    }
                }
            };
            instruction["operation"] = json!(operation.wire());
            if let Some(current) = current {
                instruction["currentVersion"] = json!(current);
            }
            if operation != Operation::Delete {
                instruction["resource"] = json!(body);
            }
            instructions.push(instruction);
            steps.push(Step { resource: r, item_id, after, change });
        }
        for &r in &picked {
            self.busy[r] = true;
        }
        let command = Command {
            id: Uuid::now_v7(),
            number,
            message: json!({ "instructions": instructions }),
            steps,
            failing_item,
        };
        self.in_flight.insert(command.id, command.clone());
        self.sent.insert(command.id, command.clone());
        Some(command)
    }

    /// The first reply to command `id` (its `message`): the model takes the outcome the reply
    /// states, records a reply that differs from the prediction, and frees the resources.
    pub fn on_first_reply(&mut self, id: Uuid, reply: &Value) {
        let Some(command) = self.in_flight.remove(&id) else { return };
        let errors = reply["errors"].as_array().cloned().unwrap_or_default();
        let applied = errors.is_empty();
        if applied != command.expect_applied() {
            self.wrong_outcomes.push(format!(
                "command {} ({}): expected {}, got {}",
                command.number,
                command.id,
                if command.expect_applied() { "applied" } else { "refused" },
                reply
            ));
        } else if let Some(item) = &command.failing_item {
            if !errors.iter().any(|e| e["itemId"].as_str() == Some(item)) {
                self.wrong_outcomes
                    .push(format!("command {}: the failing item {item} is not named: {reply}", command.number));
            }
        }
        for step in &command.steps {
            if applied {
                self.states[step.resource] = step.after.clone();
                self.expected_changes.push(step.change.clone());
            }
            self.busy[step.resource] = false;
        }
    }

    /// Commands still without a reply: their resources become unknown.
    pub fn give_up_in_flight(&mut self) -> Vec<Command> {
        let lost: Vec<Command> = self.in_flight.drain().map(|(_, c)| c).collect();
        for command in &lost {
            for step in &command.steps {
                self.states[step.resource] = ResourceState::Unknown;
            }
        }
        lost
    }
}
