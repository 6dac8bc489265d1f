"use client";
// The chat: useChat on /api/llm/chat (rewritten to the chat function), streamed as the AI SDK's
// UI message stream. Each answer's metadata says where it came from; rule answers (the LLM
// failed or is not configured) are marked as automatic.

import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport, type UIMessage } from "ai";
import { useState } from "react";
import { AuthGate } from "@/components/auth-gate";
import { parseApiError } from "@/lib/api-error";
import { authHeaders } from "@/lib/auth";

/** What the chat function puts in messageMetadata. */
type AnswerMetadata = {
  source?: "llm" | "cache" | "rules";
  fallbackReason?: string;
  model?: string;
};
type ChatMessage = UIMessage<AnswerMetadata>;

const transport = new DefaultChatTransport<ChatMessage>({
  api: "/api/llm/chat",
  // A fresh token on every request (supabase-js refreshes it when it nears expiry).
  headers: authHeaders,
});

export default function ChatPage() {
  return (
    <section>
      <h1>Ask the assistant</h1>
      <AuthGate>
        <Chat />
      </AuthGate>
    </section>
  );
}

function textOf(message: ChatMessage): string {
  return message.parts.map((part) => (part.type === "text" ? part.text : "")).join("");
}

function Chat() {
  // Requests that have ended (answered, failed or stopped): a stable hook for tests.
  const [ended, setEnded] = useState(0);
  const { messages, sendMessage, regenerate, status, error, clearError } = useChat<ChatMessage>({
    transport,
    onFinish: () => setEnded((n) => n + 1),
  });
  const [input, setInput] = useState("");
  const busy = status === "submitted" || status === "streaming";
  const problem = error ? parseApiError(error.message) : null;

  return (
    <>
      <div className="messages" aria-live="polite" data-testid="chat-messages" data-ended={ended}>
        {messages.map((message) =>
          message.role === "user" ? (
            <div key={message.id} className="turn user">
              <p data-testid="chat-message-user">{textOf(message)}</p>
            </div>
          ) : (
            <Answer key={message.id} message={message} />
          ),
        )}
        {status === "submitted" && <p className="session">Thinking…</p>}
      </div>
      {problem && (
        <p className="notice error" data-testid="chat-error" data-code={problem.code}>
          {problem.message}{" "}
          <button type="button" className="link" onClick={clearError}>
            Dismiss
          </button>
        </p>
      )}
      <form
        className="composer"
        onSubmit={(event) => {
          event.preventDefault();
          if (input.trim() === "" || busy) return;
          sendMessage({ text: input });
          setInput("");
        }}
      >
        <input
          data-testid="chat-input"
          value={input}
          onChange={(event) => setInput(event.target.value)}
          placeholder="Ask anything…"
          aria-label="Your question"
        />
        <button type="submit" data-testid="chat-send" disabled={busy || input.trim() === ""}>
          Send
        </button>
        {messages.length > 0 && !busy && (
          <button type="button" data-testid="chat-regenerate" onClick={() => regenerate()}>
            Regenerate
          </button>
        )}
      </form>
    </>
  );
}

function Answer({ message }: { message: ChatMessage }) {
  const source = message.metadata?.source;
  return (
    <article className="turn" data-testid="chat-answer" data-source={source ?? ""}>
      <p data-testid="chat-message-assistant">{textOf(message)}</p>
      {source === "rules" ? (
        <span
          className="badge automatic"
          data-testid="answer-automatic"
          title={`The assistant was unavailable (${message.metadata?.fallbackReason ?? "unknown"}); this is an automatic answer.`}
        >
          Automatic answer
        </span>
      ) : source === "cache" ? (
        <span className="badge">Answered before</span>
      ) : null}
    </article>
  );
}
