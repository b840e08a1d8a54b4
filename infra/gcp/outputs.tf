output "api_url" {
  description = "The broker's HTTP API."
  value       = google_cloudfunctions2_function.function["api"].service_config[0].uri
}

output "dlq_url" {
  description = "The dead-letter function (operators: an identity token in X-Serverless-Authorization, a broker token for '*' in Authorization)."
  value       = google_cloudfunctions2_function.function["dlq"].service_config[0].uri
}

output "store_instance" {
  description = "The Cloud SQL instance's connection name."
  value       = google_sql_database_instance.store.connection_name
}

output "database_users" {
  description = "The IAM database users to grant the broker's tables to (see the README)."
  value       = { for name, user in google_sql_user.function : name => user.name }
}

output "jobs_topic" {
  description = "The job topic (KIDP_QUEUE_URL names it)."
  value       = google_pubsub_topic.jobs.id
}
