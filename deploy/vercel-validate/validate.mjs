// Validates vercel.json with Vercel's own routing utilities (@vercel/routing-utils, the package
// the Vercel CLI and build use): each routing key against its published JSON schema, then
// getTransformedRoutes, which compiles the rewrites exactly as a deployment would.
import { readFileSync } from "node:fs";
import Ajv from "ajv";
import routing from "@vercel/routing-utils";

const file = process.argv[2] ?? "vercel.json";
const config = JSON.parse(readFileSync(file, "utf8"));
const schemas = {
  rewrites: routing.rewritesSchema,
  redirects: routing.redirectsSchema,
  headers: routing.headersSchema,
  routes: routing.routesSchema,
  cleanUrls: routing.cleanUrlsSchema,
  trailingSlash: routing.trailingSlashSchema,
};
// Top-level keys Vercel accepts besides the routing ones (vercel.json reference).
const otherKeys = new Set(["$schema", "buildCommand", "devCommand", "framework", "installCommand",
  "outputDirectory", "functions", "crons", "regions", "public", "github", "git", "images"]);
const errors = [];
const ajv = new Ajv({ allErrors: true, strict: false });
for (const [key, value] of Object.entries(config)) {
  if (schemas[key]) {
    const validate = ajv.compile(schemas[key]);
    if (!validate(value)) errors.push(`${key}: ${ajv.errorsText(validate.errors)}`);
  } else if (!otherKeys.has(key)) {
    errors.push(`unknown top-level key ${JSON.stringify(key)}`);
  }
}
const { error } = routing.getTransformedRoutes(config);
if (error) errors.push(`${error.code}: ${error.message}`);
for (const [source, target] of [["/api/llm/chat", "chat"], ["/api/pay/checkout", "checkout"], ["/api/stripe/webhook", "webhook"]]) {
  const rule = (config.rewrites ?? []).find((r) => r.source === source);
  if (!rule) errors.push(`no rewrite for ${source} (the ${target} function)`);
  else if (!/^https:\/\/[a-z0-9-]+(\.[a-z0-9-]+)+\/$/.test(rule.destination)) errors.push(`${source}: destination must be an https function URL`);
}
// useChat's resume probe (GET /api/llm/chat/{chatId}/stream) must reach the chat function too.
const chat = (config.rewrites ?? []).find((r) => r.source === "/api/llm/chat");
const probe = (config.rewrites ?? []).find((r) => r.source === "/api/llm/chat/:path*");
if (chat && (!probe || probe.destination !== `${chat.destination}:path*`)) {
  errors.push("no rewrite of /api/llm/chat/:path* to the chat function URL + :path* (useChat's resume probe)");
}
if (errors.length) {
  console.error(`${file} is invalid:\n  ${errors.join("\n  ")}`);
  process.exit(1);
}
console.log(`${file} is valid (${config.rewrites.length} rewrites)`);
