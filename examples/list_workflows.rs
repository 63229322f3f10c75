//! Lists your workflows over gRPC with an API key, through the crate's own generated client (the
//! one `turbocat runner` uses). `cargo test` compiles it and
//! `tests/console` runs it; the README shows it.
//!
//!     TURBOCAT_API_KEY=… cargo run --example list_workflows -- http://127.0.0.1:8080

use turbocat::proto::v1::ListWorkflowsRequest;
use turbocat::proto::v1::workflow_service_client::WorkflowServiceClient;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
    let api_key = std::env::var("TURBOCAT_API_KEY")?;
    let mut client = WorkflowServiceClient::connect(server).await?;
    let mut request =
        tonic::Request::new(ListWorkflowsRequest { page_size: Some(50), ..Default::default() });
    request.metadata_mut().insert("x-api-key", api_key.parse()?);
    for workflow in client.list_workflows(request).await?.into_inner().workflows {
        println!("{} {} (version {})", workflow.id, workflow.name, workflow.version);
    }
    Ok(())
}
