// The functions answer errors as {"error":{"code","message","request_id"}}; useChat hands the
// response text over as the error's message.

export type ApiError = { status?: number; code: string; message: string };

/** Reads an error body (or useChat's error text) into code and message. */
export function parseApiError(text: string, status?: number): ApiError {
  try {
    const body = JSON.parse(text);
    if (body?.error?.code) {
      return { status, code: String(body.error.code), message: String(body.error.message ?? "") };
    }
  } catch {
    // not JSON: a network failure or a proxy's page
  }
  return { status, code: "unexpected", message: text || "the request failed" };
}
