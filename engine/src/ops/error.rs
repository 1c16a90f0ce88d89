//! The one error of every operation: a kind the adapters branch on (the
//! HTTP status, the CLI's exit code, the scheduler's "busy, try later"),
//! a message that says what happened and what to do, and the error that
//! caused it.

use crate::backup::BackupError;
use crate::restore::RestoreError;
use crate::store::pages::PageError;
use crate::store::StoreError;

/// What kind of failure an operation met. Adapters map each kind once:
/// the API to an HTTP status, the CLI to an exit code, the scheduler to
/// "skip and retry later" or "failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A disk, snapshot, chunk or policy that does not exist.
    NotFound,
    /// The request contradicts the state: the snapshot exists, is
    /// protected, the target exists.
    Conflict,
    /// Another job holds what this one needs; the same request later works.
    Busy,
    /// A quota is reached or would be exceeded.
    Quota,
    /// The store's disk is full.
    StoreFull,
    /// The request is malformed or cannot make sense.
    Invalid,
    /// Stored data failed its checks (a manifest, a page, a chunk).
    Damaged,
    /// The caller may not do this (a restore target outside the restore
    /// folders, another tenant's snapshot).
    Forbidden,
    /// Anything else: I/O errors, a store server that failed.
    Internal,
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An operation's error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Source>,
}

impl OpError {
    /// An error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    pub fn with_source(mut self, source: impl Into<Source>) -> OpError {
        self.source = Some(source.into());
        self
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Its message (the `Display` text).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message with `context` before it (`context: message`), same
    /// kind and source.
    pub fn context(mut self, context: impl std::fmt::Display) -> OpError {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Shorthand for [`ErrorKind::Invalid`].
    pub fn invalid(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::Invalid, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for [`ErrorKind::Conflict`].
    pub fn conflict(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::Conflict, message)
    }

    /// Shorthand for [`ErrorKind::Busy`].
    pub fn busy(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::Busy, message)
    }

    /// Shorthand for [`ErrorKind::Forbidden`].
    pub fn forbidden(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::Forbidden, message)
    }

    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> OpError {
        OpError::new(ErrorKind::Internal, message)
    }

    /// The error of a cancelled job (`what` was cancelled).
    pub fn cancelled(what: &str) -> OpError {
        OpError::new(ErrorKind::Internal, format!("{what} was cancelled"))
    }
}

/// The kind of a store error; the one place that decides it.
pub fn store_kind(e: &StoreError) -> ErrorKind {
    match e {
        StoreError::MissingChunk(_) | StoreError::NoSnapshot(_) => ErrorKind::NotFound,
        StoreError::Exists(_) => ErrorKind::Conflict,
        StoreError::Locked(_) | StoreError::Gc(_) => ErrorKind::Busy,
        StoreError::Full { .. } => ErrorKind::StoreFull,
        StoreError::BadManifest { .. } | StoreError::Incomplete(_) => ErrorKind::Damaged,
        StoreError::Immutable(_) => ErrorKind::Invalid,
        StoreError::Unsupported { .. } | StoreError::Remote { .. } | StoreError::Io { .. } => {
            ErrorKind::Internal
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        OpError::new(store_kind(&e), e.to_string()).with_source(e)
    }
}

impl From<PageError> for OpError {
    fn from(e: PageError) -> Self {
        OpError::new(ErrorKind::Damaged, e.to_string()).with_source(e)
    }
}

impl From<BackupError> for OpError {
    fn from(e: BackupError) -> Self {
        let kind = match &e {
            BackupError::Store(s) => store_kind(s),
            BackupError::BadBase { .. } => ErrorKind::Damaged,
            BackupError::Quota(_) => ErrorKind::Quota,
            BackupError::Read(_) | BackupError::Cancelled | BackupError::Zstd(..) => {
                ErrorKind::Internal
            }
        };
        OpError::new(kind, e.to_string()).with_source(e)
    }
}

impl From<RestoreError> for OpError {
    fn from(e: RestoreError) -> Self {
        let kind = match &e {
            RestoreError::Exists(_) => ErrorKind::Conflict,
            RestoreError::TooSmall { .. } | RestoreError::NotATarget { .. } => ErrorKind::Invalid,
            RestoreError::Index(_) | RestoreError::BadChunk { .. } => ErrorKind::Damaged,
            RestoreError::Write { .. } | RestoreError::Cancelled => ErrorKind::Internal,
        };
        OpError::new(kind, e.to_string()).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_keep_their_message_and_get_one_kind() {
        let id: crate::ids::SnapshotId = "vm@20260101T000000Z".parse().unwrap();
        let e = OpError::from(StoreError::NoSnapshot(id.clone()));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("novabackup snapshots"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let full = StoreError::io("/s", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(OpError::from(full).kind(), ErrorKind::StoreFull);
        let disk = "vm".parse().unwrap();
        assert_eq!(
            OpError::from(StoreError::Locked(disk)).kind(),
            ErrorKind::Busy
        );
        assert_eq!(
            OpError::from(StoreError::Exists(id)).kind(),
            ErrorKind::Conflict
        );
    }

    #[test]
    fn context_goes_before_the_message_and_keeps_the_kind() {
        let e = OpError::busy("disk vm is busy").context("backup of vm");
        assert_eq!(e.to_string(), "backup of vm: disk vm is busy");
        assert_eq!(e.kind(), ErrorKind::Busy);
    }
}
