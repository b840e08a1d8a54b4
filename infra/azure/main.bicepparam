// Parameters for `az deployment group create -f infra/azure/main.bicep -p infra/azure/main.bicepparam`.
// The two keys come from the environment of the deploying shell, never from this file.
using './main.bicep'

param name = 'kidp'
param managedResourceGroupName = 'kidp-managed'
param jwtSecret = readEnvironmentVariable('KIDP_JWT_SECRET', '')
param callbackSecret = readEnvironmentVariable('KIDP_CALLBACK_SECRET')
param jobMaxDeliveries = 10
param logLevel = 'INFO'
