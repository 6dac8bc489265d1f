"use client";
// Who the user is, as the functions see it: a Supabase access token sent as the bearer.
//
// With NEXT_PUBLIC_SUPABASE_URL and NEXT_PUBLIC_SUPABASE_ANON_KEY set, sign-in is Supabase Auth
// (supabase-js keeps and refreshes the session). Without them, the local dev switch: a token from
// `cargo run -q -p tools --bin mint-token` (NEXT_PUBLIC_DEV_ACCESS_TOKEN fills the form), kept in
// this browser's localStorage. The functions verify the token either way.

import { createClient, type SupabaseClient } from "@supabase/supabase-js";
import { useEffect, useState } from "react";

const supabaseUrl = process.env.NEXT_PUBLIC_SUPABASE_URL;
const supabaseKey =
  process.env.NEXT_PUBLIC_SUPABASE_ANON_KEY ?? process.env.NEXT_PUBLIC_SUPABASE_PUBLISHABLE_KEY;

/** The Supabase client, or null in dev-token mode. */
export const supabase: SupabaseClient | null =
  supabaseUrl && supabaseKey ? createClient(supabaseUrl, supabaseKey) : null;

/** The token the dev sign-in form starts with. */
export const devTokenDefault = process.env.NEXT_PUBLIC_DEV_ACCESS_TOKEN ?? "";

const DEV_TOKEN_KEY = "saas-example.dev-access-token";
const listeners = new Set<() => void>();
const changed = () => listeners.forEach((listener) => listener());

/** The current access token (refreshed by supabase-js when needed), or null when signed out. */
export async function accessToken(): Promise<string | null> {
  if (supabase) {
    const { data } = await supabase.auth.getSession();
    return data.session?.access_token ?? null;
  }
  return window.localStorage.getItem(DEV_TOKEN_KEY);
}

/** Headers that carry the token, for fetch and useChat. */
export async function authHeaders(): Promise<Record<string, string>> {
  const token = await accessToken();
  return token ? { authorization: `Bearer ${token}` } : {};
}

/** Dev mode: signs in with a token (checked by the functions on first use, not here). */
export function signInWithDevToken(token: string) {
  window.localStorage.setItem(DEV_TOKEN_KEY, token.trim());
  changed();
}

/** Supabase mode: email and password. Returns an error message or null. */
export async function signInWithPassword(email: string, password: string): Promise<string | null> {
  if (!supabase) return "Supabase is not configured";
  const { error } = await supabase.auth.signInWithPassword({ email, password });
  return error ? error.message : null;
}

export async function signOut() {
  if (supabase) await supabase.auth.signOut();
  else window.localStorage.removeItem(DEV_TOKEN_KEY);
  changed();
}

/** "loading" until the session is known, then whether someone is signed in. */
export function useSignedIn(): "loading" | boolean {
  const [state, setState] = useState<"loading" | boolean>("loading");
  useEffect(() => {
    const check = () => {
      accessToken().then((token) => setState(token !== null && token !== ""));
    };
    check();
    listeners.add(check);
    const subscription = supabase?.auth.onAuthStateChange(() => check()).data.subscription;
    return () => {
      listeners.delete(check);
      subscription?.unsubscribe();
    };
  }, []);
  return state;
}
