// A workflow's DAG as SVG, laid out by dagre (left to right; top to bottom on a phone-sized
// screen, where a wide graph would shrink past reading); each step coloured by its status.
import { Graph, layout } from '@dagrejs/dagre';
import { html } from './ui';

export interface DagStep {
  key: string;
  dependsOn: string[];
  /** STEP_RUN_STATUS name without prefix (PENDING, RUNNING, …), or '' before any run. */
  status?: string;
  label?: string;
}

const NODE_WIDTH = 150;
const NODE_HEIGHT = 44;
/** The longest text that fits a node; longer keys are cut, the whole one is the node's title. */
const NODE_CHARACTERS = 20;

function fit(text: string): string {
  return text.length > NODE_CHARACTERS ? `${text.slice(0, NODE_CHARACTERS - 1)}…` : text;
}

function narrow(): boolean {
  return typeof matchMedia === 'function' && matchMedia('(max-width: 640px)').matches;
}

export function Dag(props: { steps: DagStep[] }) {
  const graph = new Graph();
  graph.setGraph({ rankdir: narrow() ? 'TB' : 'LR', nodesep: 24, ranksep: 48, marginx: 8, marginy: 8 });
  graph.setDefaultEdgeLabel(() => ({}));
  for (const step of props.steps) graph.setNode(step.key, { width: NODE_WIDTH, height: NODE_HEIGHT });
  for (const step of props.steps) {
    for (const dependency of step.dependsOn) {
      if (graph.hasNode(dependency)) graph.setEdge(dependency, step.key);
    }
  }
  layout(graph);
  const size = graph.graph();
  const width = Math.max(size.width ?? 0, NODE_WIDTH + 16);
  const height = Math.max(size.height ?? 0, NODE_HEIGHT + 16);
  return html`<svg class="dag" role="img" aria-label="workflow graph" viewBox="0 0 ${width} ${height}"
      width=${width} height=${height}>
    <defs>
      <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto-start-reverse">
        <path d="M 0 0 L 10 5 L 0 10 z" class="arrow" />
      </marker>
    </defs>
    ${graph.edges().map((edge) => {
      const points: { x: number; y: number }[] = graph.edge(edge).points ?? [];
      const d = points.map((point, index) => `${index ? 'L' : 'M'} ${point.x} ${point.y}`).join(' ');
      return html`<path class="edge" d=${d} marker-end="url(#arrow)" data-from=${edge.v} data-to=${edge.w} />`;
    })}
    ${props.steps.map((step) => {
      const node = graph.node(step.key);
      const status = step.status || 'NONE';
      return html`<g class="node status-${status}" data-step=${step.key} data-status=${status}
          transform="translate(${node.x - NODE_WIDTH / 2}, ${node.y - NODE_HEIGHT / 2})">
        <title>${step.key}</title>
        <rect width=${NODE_WIDTH} height=${NODE_HEIGHT} rx="6" />
        <text x=${NODE_WIDTH / 2} y="18" text-anchor="middle" class="key">${fit(step.key)}</text>
        <text x=${NODE_WIDTH / 2} y="34" text-anchor="middle" class="label">${fit(step.label ?? (step.status || ''))}</text>
      </g>`;
    })}
  </svg>`;
}
