// The console: a session, a navigation bar and one page per client route.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { client, currentSession, onSessionChange, setSession, type Session } from './api';
import { html, Link, navigate, usePath } from './ui';
import { AuthService } from './gen/turbocat/v1/auth_pb';
import { UserRole } from './gen/turbocat/v1/user_pb';
import { RegisterPage, SignInPage } from './pages/auth';
import { DashboardPage } from './pages/dashboard';
import { AgentsPage } from './pages/agents';
import { WorkflowEditPage, WorkflowPage, WorkflowsPage } from './pages/workflows';
import { ExecutionPage, ExecutionsPage } from './pages/execution';
import { ApiKeysPage } from './pages/api_keys';
import { DeploymentsPage, RunnersPage, TemplatesPage, UsersPage } from './pages/more';
import './style.css';

type Route = [RegExp, (params: string[]) => unknown];

const ROUTES: Route[] = [
  [/^\/$/, () => html`<${DashboardPage} />`],
  [/^\/agents$/, () => html`<${AgentsPage} />`],
  [/^\/workflows$/, () => html`<${WorkflowsPage} />`],
  [/^\/workflows\/new$/, () => html`<${WorkflowEditPage} />`],
  [/^\/workflows\/([^/]+)\/edit$/, ([id]) => html`<${WorkflowEditPage} workflowId=${id} />`],
  [/^\/workflows\/([^/]+)$/, ([id]) => html`<${WorkflowPage} workflowId=${id} />`],
  [/^\/executions$/, () => html`<${ExecutionsPage} />`],
  [/^\/executions\/([^/]+)$/, ([id]) => html`<${ExecutionPage} executionId=${id} />`],
  [/^\/templates$/, () => html`<${TemplatesPage} />`],
  [/^\/deployments$/, () => html`<${DeploymentsPage} />`],
  [/^\/runners$/, () => html`<${RunnersPage} />`],
  [/^\/api-keys$/, () => html`<${ApiKeysPage} />`],
  [/^\/users$/, () => html`<${UsersPage} />`],
];

function page(path: string) {
  const pathname = path.split('?')[0];
  for (const [pattern, show] of ROUTES) {
    const match = pattern.exec(pathname);
    if (match) return show(match.slice(1).map(decodeURIComponent));
  }
  return html`<h1>Not found</h1><p>No page at <code>${pathname}</code>. <${Link} href="/">Dashboard</${Link}></p>`;
}

function App() {
  const path = usePath();
  const [session, setCurrent] = useState<Session | null>(currentSession());
  useEffect(() => onSessionChange(setCurrent), []);
  const pathname = path.split('?')[0];

  if (!session) {
    if (pathname === '/register') return html`<main class="narrow"><${RegisterPage} /></main>`;
    return html`<main class="narrow"><${SignInPage} /></main>`;
  }
  if (pathname === '/signin' || pathname === '/register') {
    navigate('/');
    return null;
  }
  const signOut = async () => {
    const refreshToken = session.refreshToken;
    try {
      await client(AuthService).logout({ refreshToken });
    } finally {
      setSession(null);
      navigate('/signin');
    }
  };
  const admin = session.user.role === UserRole.ADMIN;
  const links: [string, string][] = [
    ['/', 'Dashboard'],
    ['/workflows', 'Workflows'],
    ['/executions', 'Executions'],
    ['/agents', 'Agents'],
    ['/templates', 'Templates'],
    ['/deployments', 'Deployments'],
    ['/runners', 'Runners'],
    ['/api-keys', 'API keys'],
    ...(admin ? ([['/users', 'Users']] as [string, string][]) : []),
  ];
  return html`<header class="top">
      <strong class="brand">Turbocat</strong>
      <nav aria-label="main">
        ${links.map(
          ([href, label]) =>
            html`<${Link} href=${href} class=${isCurrent(pathname, href) ? 'current' : ''}>${label}</${Link}>`,
        )}
      </nav>
      <span class="who">${session.user.email}</span>
      <button class="link" onClick=${signOut}>Sign out</button>
    </header>
    <main>${page(path)}</main>`;
}

function isCurrent(pathname: string, href: string): boolean {
  return href === '/' ? pathname === '/' : pathname.startsWith(href);
}

const root = document.getElementById('app');
if (root) render(html`<${App} />`, root);
