//! gRPC face of `RunnerService`: the bidirectional `Attach` stream that runners hold open, and
//! the list of attached runners. The stream is pumped here; what each message means is the
//! engine's business (`crate::engine::protocol`).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::app::AppContext;
use crate::auth::caller::caller_of;
use crate::error::ServiceError;
use crate::proto::v1::{self as pb, runner_service_server};
use crate::service::runner_access::runner_grant;

/// Messages queued for one runner before the server stops reading its stream.
const OUTBOUND_BUFFER: usize = 64;

#[derive(Clone)]
pub struct RunnerGrpc {
    context: Arc<AppContext>,
}

impl RunnerGrpc {
    pub fn new(context: Arc<AppContext>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl runner_service_server::RunnerService for RunnerGrpc {
    async fn attach(
        &self,
        request: Request<Streaming<pb::AttachRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::AttachResponse>>, Status> {
        if self.context.engine.is_shutting_down() {
            return Err(Status::unavailable(crate::engine::shutdown::SHUTTING_DOWN));
        }
        let caller = caller_of(&request)?;
        let grant = runner_grant(&caller)?;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AttachRequest {
                message: Some(pb::attach_request::Message::Hello(hello)),
            }) => hello,
            _ => {
                return Err(ServiceError::invalid_field(
                    "hello",
                    "the first message must be a hello",
                )
                .into());
            }
        };
        let engine = self.context.engine.clone();
        let (sender, receiver) = mpsc::channel(OUTBOUND_BUFFER);
        let (runner, accepted) = engine
            .attach_runner(hello, grant, sender.clone())
            .await
            .map_err(|error| ServiceError::invalid_field(error.field, error.message))?;
        let accepted =
            pb::AttachResponse { message: Some(pb::attach_response::Message::Accepted(accepted)) };
        if sender.send(Ok(accepted)).await.is_err() {
            engine.detach_runner(&runner).await;
            return Err(Status::cancelled("the runner went away"));
        }
        if engine.is_shutting_down() {
            // Attached while the shutdown asked the others to move: this one moves too.
            runner.set_draining();
            let _ =
                sender.try_send(Err(Status::unavailable(crate::engine::shutdown::SHUTTING_DOWN)));
        }
        tokio::spawn(async move {
            let mut inbox = engine.runner_inbox(runner.clone());
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    // The runner's right to work was withdrawn: stop listening to it.
                    () = runner.withdrawn() => break,
                };
                match next {
                    Ok(Some(pb::AttachRequest { message: Some(message) })) => {
                        inbox.deliver(message).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(runner_id = %runner.id, code = ?status.code(), "runner stream broke");
                        break;
                    }
                }
            }
            inbox.close().await;
            engine.detach_runner(&runner).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn list_runners(
        &self,
        request: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        let caller = caller_of(&request)?;
        let response = crate::service::runner_listing::list_runners(
            &self.context,
            &caller,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(response))
    }
}
