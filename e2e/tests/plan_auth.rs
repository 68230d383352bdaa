//! Agents prove which node they run on before they get a plan (DESIGN §3): a cluster of its own
//! (2 real nodes, Weft installed from `config/`) whose agents present `weft-system/weft-agent`
//! tokens for the audience `weft-operator`, bound to their pod on their node, over TLS (the cluster CA signed the plan service's
//! certificate). A gRPC client of the plan service, on the nodes' bridge like an agent, tries the
//! ways in a node could lie or a stranger could ask: plain text, no token, another
//! node's token, a token bound to nothing, one for the API server's audience, one of another
//! ServiceAccount. Each is refused with a message that says why (and counted in
//! `weft_plan_auth_refusals_total`); node-1's own token opens node-1's plan.
//! Needs root and `cargo build --workspace --bins`.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use tokio_stream::StreamExt as _;
use weft_api::plan::{self as pb, plan_service_client::PlanServiceClient};
use weft_e2e::cluster::{PLAN_PORT, Steps, TestCluster, TestOptions, metric_value, metrics_text};

/// The operator replica the test talks to, the leader (only it serves plan streams): its plan
/// service and its metrics.
async fn replica(c: &TestCluster) -> Result<(SocketAddrV4, SocketAddrV4)> {
    let metrics = c.operator_leader_metrics_addr().await?;
    Ok((SocketAddrV4::new(*metrics.ip(), PLAN_PORT), metrics))
}

/// A client of the replica's plan service over TLS, trusting the cluster's CA.
async fn client(c: &TestCluster) -> Result<PlanServiceClient<tonic::transport::Channel>> {
    let state = c.state();
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(state.ca_cert())?);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", replica(c).await?.0))?
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca))?
        .connect()
        .await?;
    Ok(PlanServiceClient::new(channel))
}

/// What the plan service said to a Hello as `node`, presenting `token`: the first plan message,
/// or the refusal.
async fn ask(
    mut client: PlanServiceClient<tonic::transport::Channel>,
    token: Option<&str>,
    node: &str,
) -> Result<Result<pb::PlanMessage, tonic::Status>> {
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node: node.into(),
            agent_version: "plan_auth test".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    // The stream stays open (as an agent's does) until the first answer is read.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    }
    let mut inbound = match client.watch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let first = tokio::time::timeout(Duration::from_secs(30), inbound.next())
        .await
        .context("no plan message within 30 s")?
        .context("the stream ended without a message")?;
    drop(tx);
    Ok(first)
}

/// Expects a refusal with `code` whose message contains `says`.
async fn expect_refused(
    c: &TestCluster,
    token: Option<&str>,
    node: &str,
    code: tonic::Code,
    says: &str,
) -> Result<()> {
    match ask(client(c).await?, token, node).await? {
        Ok(m) => bail!("a Hello as {node} was answered with plan version {} instead of refused", m.version),
        Err(status) => {
            ensure!(
                status.code() == code && status.message().contains(says),
                "a Hello as {node}: refused with {:?} {:?}, expected {code:?} saying {says:?}",
                status.code(),
                status.message()
            );
            Ok(())
        }
    }
}

/// `kubectl create token` with extra arguments.
async fn token(c: &TestCluster, args: &[&str]) -> Result<String> {
    let mut all = vec!["create", "token"];
    all.extend_from_slice(args);
    Ok(c.kubectl(&all).await?.trim().to_string())
}

#[tokio::test]
async fn plan_streams_need_a_token_bound_to_the_node_they_ask_for() -> Result<()> {
    let s = Steps::new("plan_auth");
    let c = TestCluster::start(
        TestOptions::default().nodes(2).weft(true).weft_dev(env!("CARGO_BIN_EXE_weft-dev")),
    )
    .await?;
    let nodes = c.nodes();
    c.wait_for("both agents to run their plans (networkconfig 2/2)", Duration::from_secs(60), || async {
        let rows = c.get_table(&["networkconfig", "default"]).await?;
        let row = rows.first().context("no row")?;
        if row.get("CONVERGED").map(String::as_str) == Some("2/2") { Ok(Some(())) } else { bail!("{row:?}") }
    })
    .await?;
    s.step("cluster up: both agents got their plans with their own tokens");
    // What node-1's agent presents: a token of its ServiceAccount for the operator, bound to its
    // pod on node-1 (the DaemonSet's projected token).
    let agent_pod = c
        .kubectl(&[
            "get",
            "pods",
            "-n",
            "weft-system",
            "-l",
            "app.kubernetes.io/name=weft-agent",
            "--field-selector",
            &format!("spec.nodeName={}", nodes[0].name),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])
        .await?;
    let node1_token = token(
        &c,
        &[
            "weft-agent",
            "-n",
            "weft-system",
            "--audience",
            "weft-operator",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            agent_pod.trim(),
        ],
    )
    .await?;
    let (plan_addr, metrics_addr) = replica(&c).await?;

    // The service speaks only TLS: a plain HTTP/2 client with node-1's own token gets nothing.
    let plain = async {
        let client = PlanServiceClient::connect(format!("http://{plan_addr}")).await?;
        ask(client, Some(&node1_token), "node-1").await
    };
    if let Ok(Ok(m)) = plain.await {
        bail!("a plain-text client got plan version {}", m.version);
    }
    s.step("plain HTTP/2: no plan");
    expect_refused(&c, None, "node-1", tonic::Code::Unauthenticated, "no bearer token").await?;
    s.step("no token: Unauthenticated");
    expect_refused(&c, Some(&node1_token), "node-2", tonic::Code::PermissionDenied, "issued for node node-1")
        .await?;
    s.step("node-1's token asking for node-2's plan: PermissionDenied");
    let unbound = token(&c, &["weft-agent", "-n", "weft-system", "--audience", "weft-operator"]).await?;
    expect_refused(&c, Some(&unbound), "node-1", tonic::Code::PermissionDenied, "not bound to a node")
        .await?;
    s.step("an agent token bound to no node: PermissionDenied");
    let api_audience = token(
        &c,
        &["weft-agent", "-n", "weft-system", "--bound-object-kind", "Node", "--bound-object-name", "node-1"],
    )
    .await?;
    expect_refused(&c, Some(&api_audience), "node-1", tonic::Code::Unauthenticated, "not accepted").await?;
    s.step("a token for the API server's audience: Unauthenticated");
    let stranger = token(
        &c,
        &[
            "default",
            "-n",
            "default",
            "--audience",
            "weft-operator",
            "--bound-object-kind",
            "Node",
            "--bound-object-name",
            "node-1",
        ],
    )
    .await?;
    expect_refused(
        &c,
        Some(&stranger),
        "node-1",
        tonic::Code::PermissionDenied,
        "not to the agents' ServiceAccount",
    )
    .await?;
    s.step("another ServiceAccount's token: PermissionDenied");

    let metrics = metrics_text(metrics_addr.into()).await?;
    for reason in ["no_token", "wrong_node", "not_bound", "invalid", "wrong_user"] {
        let series = format!("weft_plan_auth_refusals_total{{reason=\"{reason}\"}}");
        ensure!(metric_value(&metrics, &series) == Some(1.0), "{series} is not 1");
    }
    s.step("each refusal counted by reason");

    let plan = ask(client(&c).await?, Some(&node1_token), "node-1")
        .await?
        .map_err(|s| anyhow::anyhow!("refused: {s:?}"))?;
    ensure!(
        plan.version > 0,
        "node-1's own token opened a stream, but its first message has no plan version"
    );
    s.step(&format!("node-1's own token: node-1's plan (version {})", plan.version));
    Ok(())
}
