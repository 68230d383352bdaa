//! Who is on the other end of a plan stream (DESIGN §3). An agent presents a ServiceAccount token
//! for the audience `weft-operator` that is bound to its node — the DaemonSet pod's projected
//! token, or a token bound to the Node object itself — as `authorization: Bearer <token>`. A
//! TokenReview tells whose token it is and which node it was issued for; the stream then gets
//! that node's plan only, so a node cannot read another's plan (nor TLS Secrets, which only
//! ingress nodes' plans hold).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use tonic::Status;
use tonic::metadata::MetadataMap;

/// The audience agent tokens are issued for (config/agent/daemonset.yaml's projected token).
pub const AUDIENCE: &str = "weft-operator";
/// The TokenReview `user.extra` key naming the node a bound token was issued for.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Why a plan stream was refused; `reason()` labels the metric.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "no bearer token: an agent presents a ServiceAccount token for audience {AUDIENCE} bound to its node (--plan-token-file)"
    )]
    NoToken,
    #[error("the token was not accepted by the API server: {0}")]
    Invalid(String),
    #[error("the token belongs to {user}, not to the agents' ServiceAccount {expected}")]
    WrongUser { user: String, expected: String },
    #[error("the token is not bound to a node (issue it bound to the agent's Pod or Node)")]
    NotBound,
    #[error("the token was issued for node {token} but the agent says it is node {hello}")]
    WrongNode { token: String, hello: String },
    #[error("cannot check the token with the API server: {0}")]
    Unavailable(String),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoToken => "no_token",
            Self::Invalid(_) => "invalid",
            Self::WrongUser { .. } => "wrong_user",
            Self::NotBound => "not_bound",
            Self::WrongNode { .. } => "wrong_node",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NoToken | AuthError::Invalid(_) => Status::unauthenticated(e.to_string()),
            AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
            _ => Status::permission_denied(e.to_string()),
        }
    }
}

/// How the plan server learns an agent's node.
#[derive(Clone)]
pub enum AgentAuth {
    /// A TokenReview per stream; only tokens of `user` (`system:serviceaccount:<ns>:<name>`).
    TokenReview { client: kube::Client, user: String },
    /// The node named in the agent's Hello is believed. For in-process tests of the stream only.
    Trusting,
}

impl std::fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenReview { user, .. } => f.debug_struct("TokenReview").field("user", user).finish(),
            Self::Trusting => f.write_str("Trusting"),
        }
    }
}

impl AgentAuth {
    /// Tokens of the ServiceAccount `namespace/name` are accepted.
    pub fn token_review(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self::TokenReview { client, user: format!("system:serviceaccount:{namespace}:{name}") }
    }

    /// The node the caller may get the plan of (`None` when trusting the Hello).
    pub async fn node(&self, metadata: &MetadataMap) -> Result<Option<String>, AuthError> {
        let Self::TokenReview { client, user } = self else { return Ok(None) };
        let token = bearer_token(metadata).ok_or(AuthError::NoToken)?;
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token), audiences: Some(vec![AUDIENCE.to_string()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        node_of(&reviewed.status.unwrap_or_default(), user).map(Some)
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// The node a reviewed token is bound to, if it is a valid token of `user`.
fn node_of(status: &TokenReviewStatus, user: &str) -> Result<String, AuthError> {
    if status.authenticated != Some(true) {
        let why =
            status.error.clone().filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        return Err(AuthError::Invalid(why));
    }
    let info = status.user.clone().unwrap_or_default();
    let name = info.username.unwrap_or_default();
    if name != user {
        return Err(AuthError::WrongUser { user: name, expected: user.to_string() });
    }
    info.extra
        .and_then(|mut extra| extra.remove(NODE_NAME_EXTRA))
        .and_then(|names| names.into_iter().next())
        .filter(|n| !n.is_empty())
        .ok_or(AuthError::NotBound)
}

/// Checks that the node a stream authenticated as is the node its Hello names.
pub fn check_hello(authenticated: Option<&str>, hello_node: &str) -> Result<(), AuthError> {
    match authenticated {
        Some(node) if node != hello_node => {
            Err(AuthError::WrongNode { token: node.to_string(), hello: hello_node.to_string() })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    const AGENT: &str = "system:serviceaccount:weft-system:weft-agent";

    fn reviewed(authenticated: bool, user: &str, node: Option<&str>) -> TokenReviewStatus {
        let extra = node.map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])]));
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo { username: Some(user.into()), extra, ..UserInfo::default() }),
            error: (!authenticated).then(|| "token has expired".into()),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn a_valid_node_bound_token_of_the_agent_account_names_its_node() {
        assert_eq!(node_of(&reviewed(true, AGENT, Some("node-1")), AGENT), Ok("node-1".into()));
    }

    #[test]
    fn other_tokens_are_refused_with_the_reason() {
        assert_eq!(
            node_of(&reviewed(false, AGENT, Some("node-1")), AGENT),
            Err(AuthError::Invalid("token has expired".into()))
        );
        let other = "system:serviceaccount:default:default";
        assert_eq!(
            node_of(&reviewed(true, other, Some("node-1")), AGENT),
            Err(AuthError::WrongUser { user: other.into(), expected: AGENT.into() })
        );
        assert_eq!(node_of(&reviewed(true, AGENT, None), AGENT), Err(AuthError::NotBound));
    }

    #[test]
    fn a_stream_gets_only_the_plan_of_the_node_its_token_names() {
        assert_eq!(check_hello(Some("node-1"), "node-1"), Ok(()));
        assert_eq!(
            check_hello(Some("node-1"), "node-2"),
            Err(AuthError::WrongNode { token: "node-1".into(), hello: "node-2".into() })
        );
        assert_eq!(check_hello(None, "node-2"), Ok(()));
    }

    #[test]
    fn the_bearer_token_is_read_from_the_authorization_header() {
        let mut m = MetadataMap::new();
        assert_eq!(bearer_token(&m), None);
        m.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&m), None);
        m.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&m), Some("abc.def".into()));
        let denied: Status = AuthError::NoToken.into();
        assert_eq!(denied.code(), tonic::Code::Unauthenticated);
        let denied: Status = AuthError::WrongNode { token: "a".into(), hello: "b".into() }.into();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }
}
