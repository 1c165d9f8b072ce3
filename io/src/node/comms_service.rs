//! The `Comms` gRPC service: one stream per endpoint agent.

use super::*;

/// Whether a client connecting to a minion is enrolled already, as far as the minion can tell.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Contact {
    /// Enrolled (or the master cannot be asked now: served, not paced).
    Known,
    /// No enrolment record: a new client.
    First,
}

/// On a minion: compares the client's key with its enrolment record, read through the master's
/// datastore (and the minion's read cache). With the master unreachable the client is served: its id
/// is the hash of the key it proved in the TLS handshake, and the master checks the key again when it
/// applies the replicated `ClientSeen`.
pub(super) async fn check_enrolled_key(
    r: &crate::cluster::RemoteStore,
    peer: &Peer,
) -> Result<Contact, Status> {
    let key = paths::client_record(&peer.client_id);
    match r.get(&key).await {
        Ok(Some(b)) => {
            let rec: ClientJson =
                serde_json::from_slice(&b).map_err(|e| Status::internal(format!("{key}: {e}")))?;
            let fp = crate::clock::hex(&talon_core::ids::key_fingerprint(&peer.public_key));
            if rec.key_fingerprint != fp {
                return Err(Status::permission_denied(format!(
                    "client {} presented a key it did not enrol with",
                    peer.client_id
                )));
            }
            Ok(Contact::Known)
        }
        Ok(None) => Ok(Contact::First), // The master enrols it.
        Err(e) => {
            tracing::debug!(client = %peer.client_id, error = %e, "cannot check the enrolment record now");
            Ok(Contact::Known)
        }
    }
}

/// The client-facing gRPC service.
#[derive(Clone)]
pub struct CommsService {
    node: Node,
}

impl CommsService {
    /// Serves clients through `node`.
    pub fn new(node: Node) -> CommsService {
        CommsService { node }
    }
}

/// The client's queue as the stream tonic sends.
pub struct ServerStream(mpsc::Receiver<Result<Box<comms::ServerMessage>, Status>>);

impl tokio_stream::Stream for ServerStream {
    type Item = Result<comms::ServerMessage, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|m| m.map(|r| r.map(|b| *b)))
    }
}

#[tonic::async_trait]
impl comms::comms_server::Comms for CommsService {
    type ConnectStream = ServerStream;

    async fn connect(
        &self,
        request: Request<tonic::Streaming<comms::ClientMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (peer, hello, incoming) = self.admit(request).await.inspect_err(count_refused)?;
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE_MAX);
        let conn = self
            .node
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client = peer.client_id.clone();
        self.node
            .ask(|reply| Msg::Connected {
                peer,
                hello,
                tx: tx.clone(),
                conn,
                reply,
            })
            .await
            .inspect_err(count_refused)?;
        crate::metrics::metrics().client_streams_accepted.inc();
        let span = tracing::info_span!("client", client = %client);
        let reader = read_client(self.node.clone(), client, conn, incoming, tx);
        tokio::spawn(tracing::Instrument::instrument(reader, span));
        Ok(Response::new(ServerStream(rx)))
    }
}

impl CommsService {
    /// A client's stream, up to its Hello: its certificate, the Hello itself (within
    /// `hello_timeout`), its claimed id and the deployment's nonce; on a minion, a first contact
    /// is paced (`enrolments_per_second`).
    async fn admit(
        &self,
        request: Request<tonic::Streaming<comms::ClientMessage>>,
    ) -> Result<(Peer, codec::Hello, tonic::Streaming<comms::ClientMessage>), Status> {
        let peer = request
            .extensions()
            .get::<Peer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let mut incoming = request.into_inner();
        // A client that opens the stream and stalls must not hold it open.
        let first = tokio::time::timeout(self.node.hello_timeout, incoming.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Hello within {} s (Frontend.resources.hello_timeout_s)",
                    self.node.hello_timeout.as_secs()
                ))
            })??
            .ok_or_else(|| Status::invalid_argument("stream closed before hello"))?;
        let hello = match codec::validate(first, &self.node.limits) {
            Ok(ClientInput::Hello(h)) => h,
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        codec::check_identity(&hello.claimed_id, &peer.client_id)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        if hello.deployment_nonce != self.node.nonce {
            return Err(Status::permission_denied(
                "the client's nonce is not this deployment's",
            ));
        }
        if let Meta::Remote(r) = &self.node.datastore
            && check_enrolled_key(r, &peer).await? == Contact::First
        {
            let at = self.node.clock.monotonic();
            let admitted = self
                .node
                .enrolments
                .lock()
                .is_ok_and(|mut b| b.try_take(at));
            if !admitted {
                let rate = talon_core::registry::RegistryError::EnrolmentRate {
                    per_second: self.node.enrolments_per_second,
                };
                return Err(Status::unavailable(rate.to_string()));
            }
        }
        Ok((peer, hello, incoming))
    }
}

/// Counts a client stream refused before or at its Hello, by what the refusal's code says.
fn count_refused(status: &Status) {
    let reason = match status.code() {
        tonic::Code::DeadlineExceeded => "hello_timeout",
        tonic::Code::InvalidArgument => "bad_hello",
        tonic::Code::PermissionDenied => "not_permitted",
        tonic::Code::Unauthenticated => "no_certificate",
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted => "busy",
        _ => "other",
    };
    crate::metrics::refused("frontend", reason);
}

/// Reads a client's stream until it ends, handing each message to the node, then tells the node
/// the connection is gone.
async fn read_client(
    node: Node,
    client: ClientId,
    conn: u64,
    mut incoming: tonic::Streaming<comms::ClientMessage>,
    tx: ClientTx,
) {
    // Flows this connection has shown to be tasked to this client (bounded; see `tasked`).
    let mut known: BTreeSet<FlowId> = BTreeSet::new();
    loop {
        let msg = match incoming.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(client = %client, error = %e, "client stream ended");
                // Tell the client why (e.g. a message over max_message_size: OUT_OF_RANGE).
                let _ = tx.try_send(Err(Status::new(e.code(), e.message().to_owned())));
                break;
            }
        };
        if !client_message(&node, &client, &tx, &mut known, msg).await {
            break;
        }
    }
    let _ = node.tx.send(Msg::Disconnected { client, conn }).await;
}

/// Tells a client of an error on its stream (dropped if its queue is full: it resends).
fn send_error(tx: &ClientTx, err: comms::ServerError) {
    let _ = tx.try_send(Ok(Box::new(comms::ServerMessage {
        kind: Some(server_message::Kind::Error(err)),
    })));
}

/// One message on a client's stream; false ends the stream.
async fn client_message(
    node: &Node,
    client: &ClientId,
    tx: &ClientTx,
    known: &mut BTreeSet<FlowId>,
    msg: comms::ClientMessage,
) -> bool {
    let m = crate::metrics::metrics();
    let (raw, which) = match &msg.kind {
        Some(client_message::Kind::Flow(f)) => (
            Bytes::from(f.encode_to_vec()),
            Some((f.flow_id.chars().take(64).collect::<String>(), f.seq)),
        ),
        Some(client_message::Kind::Events(e)) => (Bytes::from(e.encode_to_vec()), None),
        _ => (Bytes::new(), None),
    };
    m.client_message_bytes.inc_by(raw.len() as u64);
    let input = codec::validate(msg, &node.limits);
    let kind = match &input {
        Ok(ClientInput::Flow { data, .. }) => match data {
            FlowData::Rows { rows, .. } => {
                m.rows_received.inc_by(rows.len() as u64);
                "rows"
            }
            FlowData::FileChunk { data, .. } => {
                m.upload_bytes_received.inc_by(data.len() as u64);
                "file_chunk"
            }
            FlowData::Logs(_) => "logs",
            FlowData::Final { .. } => "final",
        },
        Ok(ClientInput::Events(_)) => "events",
        Ok(ClientInput::TaskAck { .. }) => "task_ack",
        Ok(ClientInput::Ping { .. }) => "ping",
        Ok(ClientInput::Hello(_)) => "hello",
        Err(_) => "invalid",
    };
    m.client_messages.with_label_values(&[kind]).inc();
    match input {
        Ok(ClientInput::Flow { flow, seq, data }) => {
            flow_message(node, client, tx, known, (flow, seq, data), raw).await
        }
        Ok(ClientInput::Events(e)) => {
            let key = talon_core::events::EventKey {
                client: client.clone(),
                artifact: e.artifact,
                day: e.day,
                stream: e.stream,
                seq: e.seq,
            };
            let client = client.clone();
            node.tx.send(Msg::Event { client, key, raw }).await.is_ok()
        }
        Ok(ClientInput::TaskAck { flow }) => {
            let client = client.clone();
            node.tx.send(Msg::TaskAck { client, flow }).await.is_ok()
        }
        Ok(ClientInput::Ping { time_unix_ms }) => {
            let pong = comms::ServerMessage {
                kind: Some(server_message::Kind::Pong(comms::Pong { time_unix_ms })),
            };
            let _ = tx.try_send(Ok(Box::new(pong)));
            true
        }
        Ok(ClientInput::Hello(_)) => {
            let _ = tx.try_send(Err(Status::invalid_argument(
                "a second Hello on one stream",
            )));
            false
        }
        Err(e) => {
            tracing::info!(client = %client, error = %e, "refused client message");
            // Names the refused message so the client can tell which one it was.
            let (flow_id, seq) = which.unwrap_or_default();
            let code = comms::ErrorCode::InvalidMessage as i32;
            let message = e.to_string();
            send_error(
                tx,
                comms::ServerError {
                    code,
                    message,
                    flow_id,
                    seq,
                },
            );
            true
        }
    }
}

/// A flow's message: handed to the node if the flow is tasked to this client, else refused on the
/// stream. False if the node is gone.
async fn flow_message(
    node: &Node,
    client: &ClientId,
    tx: &ClientTx,
    known: &mut BTreeSet<FlowId>,
    (flow, seq, data): (FlowId, u64, FlowData),
    raw: Bytes,
) -> bool {
    // Boxed: its state (a datastore read) exists only while it runs, not in every idle
    // connection's task.
    if let Err(err) = Box::pin(tasked(node, client, &flow, known)).await {
        let flow_id = flow.to_string();
        send_error(
            tx,
            comms::ServerError {
                seq,
                flow_id,
                ..err
            },
        );
        return true;
    }
    let client = client.clone();
    let m = Msg::Flow {
        client,
        flow,
        seq,
        data,
        raw,
    };
    node.tx.send(m).await.is_ok()
}

/// Flows remembered per connection as tasked to its client; past it the set starts over (one more
/// datastore read per flow).
pub(super) const KNOWN_FLOWS_PER_CONN_MAX: usize = 64;

/// A client may only write into flows the master created for it (their record exists): a client
/// replaying another's messages, or inventing flows, is refused with UNKNOWN_FLOW and nothing of it
/// is stored. One datastore read per flow per connection (the master's cache, or a minion's read
/// cache), never per message.
pub(super) async fn tasked(
    node: &Node,
    client: &ClientId,
    flow: &FlowId,
    known: &mut BTreeSet<FlowId>,
) -> Result<(), comms::ServerError> {
    if known.contains(flow) {
        return Ok(());
    }
    let key = paths::flow_record(client, flow);
    let mut found = node.datastore.get(&key).await;
    if let (Ok(None), Meta::Remote(r)) = (&found, &node.datastore) {
        // The minion's read cache may hold an old miss: ask the master itself before refusing.
        r.invalidate(&key);
        found = node.datastore.get(&key).await;
    }
    match found {
        Ok(Some(_)) => {
            if known.len() >= KNOWN_FLOWS_PER_CONN_MAX {
                known.clear();
            }
            known.insert(flow.clone());
            Ok(())
        }
        Ok(None) => Err(comms::ServerError {
            code: comms::ErrorCode::UnknownFlow as i32,
            message: format!("flow {flow} was never tasked to {client}; nothing was stored"),
            ..Default::default()
        }),
        Err(e) => Err(comms::ServerError {
            code: comms::ErrorCode::Busy as i32,
            message: format!("cannot check flow {flow} now ({e}); send it again later"),
            ..Default::default()
        }),
    }
}
