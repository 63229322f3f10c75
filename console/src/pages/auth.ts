// Sign in and register (the session starts here; the navigation bar signs out).
import { useState } from 'preact/hooks';
import { publicClient, sessionFrom, setSession } from '../api';
import { AuthService } from '../gen/turbocat/v1/auth_pb';
import { html, Link, navigate, RefusalBox, useAction } from '../ui';

export function SignInPage() {
  const [email, setEmail] = useState('');
  const [password, setPassword] = useState('');
  const [refusal, busy, run] = useAction();
  const submit = async (event: Event) => {
    event.preventDefault();
    const answer = await run(() => publicClient(AuthService).login({ email, password }));
    if (answer) {
      setSession(sessionFrom(answer));
      navigate('/');
    }
  };
  return html`<h1>Sign in</h1>
    <form onSubmit=${submit} class="stack">
      <label>Email <input name="email" type="email" autocomplete="username" required value=${email}
        onInput=${(event: Event) => setEmail((event.target as HTMLInputElement).value)} /></label>
      <label>Password <input name="password" type="password" autocomplete="current-password" required value=${password}
        onInput=${(event: Event) => setPassword((event.target as HTMLInputElement).value)} /></label>
      <${RefusalBox} refusal=${refusal} />
      <button type="submit" disabled=${busy}>Sign in</button>
    </form>
    <p>No account? <${Link} href="/register">Register</${Link}></p>`;
}

export function RegisterPage() {
  const [email, setEmail] = useState('');
  const [fullName, setFullName] = useState('');
  const [password, setPassword] = useState('');
  const [refusal, busy, run] = useAction();
  const submit = async (event: Event) => {
    event.preventDefault();
    const answer = await run(() =>
      publicClient(AuthService).register({ email, password, fullName }),
    );
    if (answer) {
      setSession(sessionFrom(answer));
      navigate('/');
    }
  };
  return html`<h1>Register</h1>
    <form onSubmit=${submit} class="stack">
      <label>Full name <input name="fullName" autocomplete="name" value=${fullName}
        onInput=${(event: Event) => setFullName((event.target as HTMLInputElement).value)} /></label>
      <label>Email <input name="email" type="email" autocomplete="username" required value=${email}
        onInput=${(event: Event) => setEmail((event.target as HTMLInputElement).value)} /></label>
      <label>Password <input name="password" type="password" autocomplete="new-password" required value=${password}
        onInput=${(event: Event) => setPassword((event.target as HTMLInputElement).value)} /></label>
      <${RefusalBox} refusal=${refusal} />
      <button type="submit" disabled=${busy}>Register</button>
    </form>
    <p>Have an account? <${Link} href="/signin">Sign in</${Link}></p>`;
}
