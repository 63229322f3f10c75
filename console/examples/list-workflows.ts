// Lists your workflows with an API key through the generated client (console/src/gen) and
// Connect-ES's grpc-web transport, as the console calls the server. The console's `tsc`
// type-checks it (scripts/test); the README shows it.
import { createClient } from '@connectrpc/connect';
import { createGrpcWebTransport } from '@connectrpc/connect-web';
import { WorkflowService } from '../src/gen/turbocat/v1/workflow_pb';

export async function listWorkflows(baseUrl: string, apiKey: string): Promise<string[]> {
  const transport = createGrpcWebTransport({ baseUrl, useBinaryFormat: true });
  const workflows = createClient(WorkflowService, transport);
  const answer = await workflows.listWorkflows({ pageSize: 50 }, { headers: { 'x-api-key': apiKey } });
  return answer.workflows.map((workflow) => `${workflow.id} ${workflow.name} (version ${workflow.version})`);
}
